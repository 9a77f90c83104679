/* edgeframe.c: see edgeframe.h and PROTOCOL.md. */
#include "edgeframe.h"

#include <string.h>

uint16_t ef_crc16(uint16_t crc, const uint8_t *data, size_t len)
{
    /* Bitwise: no 512-byte table, which an 8-bit MCU cannot spare. */
    while (len--) {
        uint8_t i;
        crc ^= (uint16_t)((uint16_t)*data++ << 8);
        for (i = 0; i < 8; i++)
            crc = (crc & 0x8000u) ? (uint16_t)((crc << 1) ^ 0x1021u) : (uint16_t)(crc << 1);
    }
    return crc;
}

size_t ef_cobs_encode(const uint8_t *in, size_t len, uint8_t *out)
{
    size_t code_at = 0, o = 1, i;
    uint8_t code = 1;
    for (i = 0; i < len; i++) {
        if (in[i] == 0) {
            out[code_at] = code;
            code_at = o++;
            code = 1;
        } else {
            out[o++] = in[i];
            if (++code == 0xFF) {
                out[code_at] = code;
                code_at = o++;
                code = 1;
            }
        }
    }
    out[code_at] = code;
    return o;
}

size_t ef_cobs_decode(const uint8_t *in, size_t len, uint8_t *out)
{
    size_t i = 0, o = 0;
    while (i < len) {
        uint8_t code = in[i], k;
        if (code == 0 || i + code > len)
            return 0;
        for (k = 1; k < code; k++) {
            if (in[i + k] == 0)
                return 0;
            out[o++] = in[i + k];
        }
        i += code;
        if (code != 0xFF && i < len)
            out[o++] = 0;
    }
    return o;
}

static uint8_t *put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); return p + 2; }
static uint8_t *put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
    return p + 4;
}
static uint8_t *put_f32(uint8_t *p, float f)
{
    uint32_t v;
    memcpy(&v, &f, 4);
    return put_u32(p, v);
}
uint16_t ef_get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (uint16_t)p[1] << 8); }
uint32_t ef_get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
float ef_get_f32(const uint8_t *p)
{
    uint32_t v = ef_get_u32(p);
    float f;
    memcpy(&f, &v, 4);
    return f;
}

size_t ef_encode_frame(const uint8_t *payload, size_t len, uint8_t *out, size_t out_cap)
{
    /* Stage payload + CRC at the tail of out and COBS-encode it towards the head, in
     * place: no second buffer, which matters on a 2 KiB MCU. */
    size_t n, start;
    uint16_t crc;
    if (out_cap < EF_ENCODED_MAX(len))
        return 0;
    start = out_cap - (len + 2);   /* stage payload+CRC at the end of out */
    memmove(out + start, payload, len);
    crc = ef_crc16(0xFFFF, out + start, len);
    out[start + len] = (uint8_t)crc;
    out[start + len + 1] = (uint8_t)(crc >> 8);
    /* Encoding writes at most one byte ahead of what it reads, and the staged copy
     * begins at least len/254 + 2 bytes after out[0]: the write never overtakes the read. */
    n = ef_cobs_encode(out + start, len + 2, out);
    out[n++] = 0;
    return n;
}

static size_t header(uint8_t *p, size_t cap, size_t body, uint8_t type)
{
    if (cap < body + 2)
        return 0;
    p[0] = EF_VERSION;
    p[1] = type;
    return body + 2;
}

static uint8_t *put_str8(uint8_t *p, const char *s)
{
    size_t n = strlen(s);
    *p++ = (uint8_t)n;
    memcpy(p, s, n);
    return p + n;
}

size_t ef_build_hello(uint8_t *p, size_t cap, uint16_t boot_id, uint32_t t_us, float sample_rate,
                      uint8_t format, float scale, const char *device_id, const char *firmware,
                      uint8_t n_channels, const char *const *names, const char *const *units)
{
    size_t body = 16 + 2 + strlen(device_id) + strlen(firmware), i;
    uint8_t *q;
    for (i = 0; i < n_channels; i++)
        body += 2 + strlen(names[i]) + strlen(units[i]);
    if (!header(p, cap, body, EF_HELLO))
        return 0;
    q = put_u32(put_u16(p + 2, boot_id), t_us);
    q = put_f32(q, sample_rate);
    *q++ = format;
    q = put_f32(q, scale);
    *q++ = n_channels;
    q = put_str8(put_str8(q, device_id), firmware);
    for (i = 0; i < n_channels; i++)
        q = put_str8(put_str8(q, names[i]), units[i]);
    return (size_t)(q - p);
}

static uint8_t *samples_head(uint8_t *p, uint16_t seq, uint32_t t_us, float rate, uint8_t fmt, uint8_t ch, uint8_t n)
{
    uint8_t *q = put_f32(put_u32(put_u16(p + 2, seq), t_us), rate);
    q[0] = fmt; q[1] = ch; q[2] = n;
    return q + 3;
}

size_t ef_build_samples_i16(uint8_t *p, size_t cap, uint16_t seq, uint32_t t_us, float sample_rate,
                            uint8_t channels, uint8_t count, const int16_t *values)
{
    size_t n = (size_t)channels * count, i;
    uint8_t *q;
    if (!header(p, cap, 13 + 2 * n, EF_SAMPLES))
        return 0;
    q = samples_head(p, seq, t_us, sample_rate, EF_FORMAT_INT16, channels, count);
    for (i = 0; i < n; i++)
        q = put_u16(q, (uint16_t)values[i]);
    return (size_t)(q - p);
}

size_t ef_build_samples_f32(uint8_t *p, size_t cap, uint16_t seq, uint32_t t_us, float sample_rate,
                            uint8_t channels, uint8_t count, const float *values)
{
    size_t n = (size_t)channels * count, i;
    uint8_t *q;
    if (!header(p, cap, 13 + 4 * n, EF_SAMPLES))
        return 0;
    q = samples_head(p, seq, t_us, sample_rate, EF_FORMAT_FLOAT32, channels, count);
    for (i = 0; i < n; i++)
        q = put_f32(q, values[i]);
    return (size_t)(q - p);
}

size_t ef_build_label_int(uint8_t *p, size_t cap, uint32_t t_us, int32_t label)
{
    if (!header(p, cap, 9, EF_LABEL))
        return 0;
    p[6] = 0;
    put_u32(put_u32(p + 2, t_us) + 1, (uint32_t)label);
    return 11;
}

size_t ef_build_label_float(uint8_t *p, size_t cap, uint32_t t_us, float label)
{
    if (!header(p, cap, 9, EF_LABEL))
        return 0;
    p[6] = 1;
    put_f32(put_u32(p + 2, t_us) + 1, label);
    return 11;
}

size_t ef_build_label_text(uint8_t *p, size_t cap, uint32_t t_us, const char *label)
{
    size_t n = strlen(label);
    if (n > 255 || !header(p, cap, 6 + n, EF_LABEL))
        return 0;
    p[6] = 2;
    put_str8(put_u32(p + 2, t_us) + 1, label);
    return 8 + n;
}

size_t ef_build_heartbeat(uint8_t *p, size_t cap, uint32_t t_us, uint8_t flags)
{
    if (!header(p, cap, 5, EF_HEARTBEAT))
        return 0;
    put_u32(p + 2, t_us)[0] = flags;
    return 7;
}

size_t ef_build_pong(uint8_t *p, size_t cap, uint16_t token, uint32_t t_us)
{
    if (!header(p, cap, 6, EF_PONG))
        return 0;
    put_u32(put_u16(p + 2, token), t_us);
    return 8;
}

size_t ef_build_ping(uint8_t *p, size_t cap, uint16_t token)
{
    if (!header(p, cap, 2, EF_PING))
        return 0;
    put_u16(p + 2, token);
    return 4;
}

size_t ef_build_set_rate(uint8_t *p, size_t cap, float sample_rate)
{
    if (!header(p, cap, 4, EF_SET_RATE))
        return 0;
    put_f32(p + 2, sample_rate);
    return 6;
}

size_t ef_build_command(uint8_t *p, size_t cap, uint8_t type)
{
    return header(p, cap, 0, type);
}

void ef_decoder_init(ef_decoder *d)
{
    memset(d, 0, sizeof *d);
}

int ef_decoder_feed(ef_decoder *d, uint8_t byte)
{
    if (byte == 0) { /* delimiter: judge what we have */
        int rc = EF_NONE;
        uint16_t n = d->len;
        if (d->bad)
            rc = EF_ERR_OVERFLOW;
        else if (d->code != 0)
            rc = EF_ERR_COBS; /* the last block was cut short */
        else if (n == 0)
            rc = EF_NONE; /* empty block between two delimiters */
        else if (n < 4)
            rc = EF_ERR_SHORT;
        else if (ef_crc16(0xFFFF, d->buf, n - 2u) != ef_get_u16(d->buf + n - 2))
            rc = EF_ERR_CRC;
        else if (d->buf[0] != EF_VERSION)
            rc = EF_ERR_VERSION;
        else
            rc = EF_FRAME;
        d->len = rc == EF_FRAME ? (uint16_t)(n - 2u) : 0;
        d->code = 0;
        d->zero = 0;
        d->bad = 0;
        return rc;
    }
    if (d->bad)
        return EF_NONE;
    if (d->code == 0) { /* a code byte starts a block */
        if (d->zero) {
            if (d->len >= sizeof d->buf) { d->bad = 1; return EF_NONE; }
            d->buf[d->len++] = 0;
        }
        d->zero = byte != 0xFF;
        d->code = (uint8_t)(byte - 1);
        return EF_NONE;
    }
    if (d->len >= sizeof d->buf) {
        d->bad = 1;
        return EF_NONE;
    }
    d->buf[d->len++] = byte;
    d->code--;
    return EF_NONE;
}
