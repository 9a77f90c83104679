/* Test-vector tool for the C/Python cross-check (tests/test_firmware_c.py).
 *   vectors encode   print "<name> <hex>" for every shared vector, built with edgeframe.c
 *   vectors decode   read hex from stdin, feed every byte to ef_decoder_feed, print one
 *                    line per result: "FRAME <type> <body hex>" or "ERROR <code>"
 * Build with -DEF_MAX_PAYLOAD=1024 so the long vector fits. */
#include <stdio.h>
#include <string.h>

#include "../edgeframe.h"

static void emit(const char *name, const uint8_t *payload, size_t len)
{
    static uint8_t out[EF_ENCODED_MAX(1024)];
    size_t n = ef_encode_frame(payload, len, out, sizeof out), i;
    printf("%s ", name);
    for (i = 0; i < n; i++)
        printf("%02x", out[i]);
    printf("\n");
}

static int encode(void)
{
    static uint8_t p[1100];
    static const char *const names[] = {"ax", "ay", "az"}, *const units[] = {"g", "g", "g"};
    static const int16_t i16[] = {1, -2, 3, 0, 256, -32768};
    static const float f32[] = {0.5f, -1.25f};
    static int16_t lng[300];
    size_t i;
    for (i = 0; i < 300; i++)
        lng[i] = 0x1111;
    emit("hello", p, ef_build_hello(p, sizeof p, 0x1234, 1000, 100.0f, EF_FORMAT_INT16, 1.0f / 4096,
                                    "accel-01", "1.2.0", 3, names, units));
    emit("samples_i16", p, ef_build_samples_i16(p, sizeof p, 7, 123456, 100.0f, 3, 2, i16));
    emit("samples_f32", p, ef_build_samples_f32(p, sizeof p, 65535, 0xFFFFFFF0u, 50.0f, 2, 1, f32));
    emit("samples_long", p, ef_build_samples_i16(p, sizeof p, 0x0101, 0x01010101u, 100.0f, 3, 100, lng));
    emit("label_int", p, ef_build_label_int(p, sizeof p, 5000, 3));
    emit("label_float", p, ef_build_label_float(p, sizeof p, 6000, 0.75f));
    emit("label_text", p, ef_build_label_text(p, sizeof p, 7000, "imbalance"));
    emit("heartbeat", p, ef_build_heartbeat(p, sizeof p, 8000, 1));
    emit("pong", p, ef_build_pong(p, sizeof p, 42, 9000));
    emit("ping", p, ef_build_ping(p, sizeof p, 42));
    emit("set_rate", p, ef_build_set_rate(p, sizeof p, 200.0f));
    emit("start", p, ef_build_command(p, sizeof p, EF_START));
    emit("stop", p, ef_build_command(p, sizeof p, EF_STOP));
    emit("get_hello", p, ef_build_command(p, sizeof p, EF_GET_HELLO));
    return 0;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int decode(void)
{
    static ef_decoder d;
    int c, hi = -1;
    ef_decoder_init(&d);
    while ((c = getchar()) != EOF) {
        int v = hexval(c), rc;
        if (v < 0)
            continue;
        if (hi < 0) {
            hi = v;
            continue;
        }
        rc = ef_decoder_feed(&d, (uint8_t)(hi << 4 | v));
        hi = -1;
        if (rc == EF_FRAME) {
            size_t i;
            printf("FRAME %02x ", EF_TYPE(&d));
            for (i = 0; i < EF_BODY_LEN(&d); i++)
                printf("%02x", EF_BODY(&d)[i]);
            printf("\n");
        } else if (rc != EF_NONE) {
            printf("ERROR %d\n", rc);
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "encode") == 0)
        return encode();
    if (argc == 2 && strcmp(argv[1], "decode") == 0)
        return decode();
    fprintf(stderr, "usage: %s encode|decode\n", argv[0]);
    return 2;
}
