/* edgeframe: reference C99 implementation of the firmware_bridge protocol (PROTOCOL.md).
 *
 * No heap, no dependencies beyond the C standard library; fits an 8-bit MCU (the
 * decoder state is EF_MAX_PAYLOAD + 8 bytes of RAM). Multi-byte fields are written
 * byte by byte in little-endian order, so the code is independent of the CPU's
 * endianness; float32 fields assume IEEE-754 binary32 `float` (true on AVR, ARM, ESP).
 *
 * Sending: build a payload with an ef_build_* function into a buffer, then
 * ef_encode_frame() it into the bytes to write (COBS + CRC + 0x00 delimiter).
 * Receiving: feed bytes one at a time to ef_decoder_feed(); on EF_FRAME the payload is
 * in d->buf (d->len bytes: version, type, body; CRC already checked and stripped).
 */
#ifndef EDGEFRAME_H
#define EDGEFRAME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifndef EF_MAX_PAYLOAD
#define EF_MAX_PAYLOAD 128 /* largest payload this build accepts (the host accepts 1024) */
#endif

#define EF_VERSION 1
/* device -> host */
#define EF_HELLO 0x01
#define EF_SAMPLES 0x02
#define EF_LABEL 0x03
#define EF_HEARTBEAT 0x04
#define EF_PONG 0x05
/* host -> device */
#define EF_PING 0x81
#define EF_SET_RATE 0x82
#define EF_START 0x83
#define EF_STOP 0x84
#define EF_GET_HELLO 0x85

#define EF_FORMAT_INT16 1
#define EF_FORMAT_FLOAT32 2

/* Encoded size of a payload of n bytes, delimiter included (worst case). */
#define EF_ENCODED_MAX(n) ((n) + 2u + ((n) + 2u) / 254u + 2u)

uint16_t ef_crc16(uint16_t crc, const uint8_t *data, size_t len); /* CRC-16/CCITT-FALSE; start with 0xFFFF */
size_t ef_cobs_encode(const uint8_t *in, size_t len, uint8_t *out);
/* Returns the decoded length, or 0 if the block is malformed. */
size_t ef_cobs_decode(const uint8_t *in, size_t len, uint8_t *out);

/* payload (version, type, body) -> COBS(payload, crc16 little-endian) 0x00. Returns the
 * number of bytes written to out, or 0 if out_cap < EF_ENCODED_MAX(len). */
size_t ef_encode_frame(const uint8_t *payload, size_t len, uint8_t *out, size_t out_cap);

/* Payload builders: return the payload length, or 0 if cap is too small. */
size_t ef_build_hello(uint8_t *p, size_t cap, uint16_t boot_id, uint32_t t_us, float sample_rate,
                      uint8_t format, float scale, const char *device_id, const char *firmware,
                      uint8_t n_channels, const char *const *names, const char *const *units);
size_t ef_build_samples_i16(uint8_t *p, size_t cap, uint16_t seq, uint32_t t_us, float sample_rate,
                            uint8_t channels, uint8_t count, const int16_t *values);
size_t ef_build_samples_f32(uint8_t *p, size_t cap, uint16_t seq, uint32_t t_us, float sample_rate,
                            uint8_t channels, uint8_t count, const float *values);
size_t ef_build_label_int(uint8_t *p, size_t cap, uint32_t t_us, int32_t label);
size_t ef_build_label_float(uint8_t *p, size_t cap, uint32_t t_us, float label);
size_t ef_build_label_text(uint8_t *p, size_t cap, uint32_t t_us, const char *label);
size_t ef_build_heartbeat(uint8_t *p, size_t cap, uint32_t t_us, uint8_t flags);
size_t ef_build_pong(uint8_t *p, size_t cap, uint16_t token, uint32_t t_us);
size_t ef_build_ping(uint8_t *p, size_t cap, uint16_t token);
size_t ef_build_set_rate(uint8_t *p, size_t cap, float sample_rate);
size_t ef_build_command(uint8_t *p, size_t cap, uint8_t type); /* START, STOP, GET_HELLO */

/* Streaming decoder. */
enum { EF_NONE = 0, EF_FRAME = 1, EF_ERR_OVERFLOW = -1, EF_ERR_COBS = -2, EF_ERR_SHORT = -3,
       EF_ERR_CRC = -4, EF_ERR_VERSION = -5 };

typedef struct {
    uint8_t buf[EF_MAX_PAYLOAD + 2]; /* decoded payload + CRC */
    uint16_t len;                    /* decoded bytes so far; payload length after EF_FRAME */
    uint8_t code;                    /* bytes left in the current COBS block (0 = expect a code) */
    uint8_t zero;                    /* append 0x00 before the next block */
    uint8_t bad;                     /* discard until the next delimiter */
} ef_decoder;

void ef_decoder_init(ef_decoder *d);
/* Feed one byte. Returns EF_FRAME when a valid frame completed (payload in d->buf[0..d->len)),
 * an EF_ERR_* code when a frame was rejected at its delimiter, EF_NONE otherwise. */
int ef_decoder_feed(ef_decoder *d, uint8_t byte);

/* Accessors for a decoded payload. */
#define EF_TYPE(d) ((d)->buf[1])
#define EF_BODY(d) ((d)->buf + 2)
#define EF_BODY_LEN(d) ((size_t)(d)->len - 2u)
uint16_t ef_get_u16(const uint8_t *p);
uint32_t ef_get_u32(const uint8_t *p);
float ef_get_f32(const uint8_t *p);

#ifdef __cplusplus
}
#endif

#endif
