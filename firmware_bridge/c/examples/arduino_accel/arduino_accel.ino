/* arduino_accel: stream a 3-axis analog accelerometer (e.g. ADXL335 on A0..A2) to the
 * edge runtime over USB serial with the firmware_bridge binary protocol.
 *
 * Setup: copy ../../edgeframe.h and ../../edgeframe.c next to this file, open it in the
 * Arduino IDE, upload. On the host:
 *     [[sources]]
 *     type = "serial"
 *     port = "/dev/ttyACM0"
 *     baud = 115200
 *     protocol = "binary"
 * A button between pin 2 and GND sends LABEL 1 ("fault seen") while pressed.
 * RAM: ~ 2 x 96 bytes of frame buffers + 130 bytes of decoder: fits an Uno's 2 KiB.
 */
#include "edgeframe.h"

#define CHANNELS 3
#define BLOCK 10               /* samples per SAMPLES frame */
#define BUTTON_PIN 2

static const char *const NAMES[CHANNELS] = {"ax", "ay", "az"};
static const char *const UNITS[CHANNELS] = {"g", "g", "g"};
static const float SCALE = 3.0f / 1024.0f;  /* ADC counts -> g, for a +-1.5 g part on 5 V */

static float rate_hz = 100.0f;
static bool streaming = true;
static uint16_t seq = 0, boot_id;
static int16_t block[BLOCK * CHANNELS];
static uint8_t filled = 0;
static uint32_t block_t_us, next_us, last_beat_us;
static uint8_t payload[96];
static uint8_t frame[EF_ENCODED_MAX(96)];
static ef_decoder rx;
static bool button_was_down = false;

static void send_payload(size_t len)
{
    size_t n = ef_encode_frame(payload, len, frame, sizeof frame);
    if (n)
        Serial.write(frame, n);
}

static void send_hello()
{
    send_payload(ef_build_hello(payload, sizeof payload, boot_id, micros(), rate_hz, EF_FORMAT_INT16, SCALE,
                                "arduino-accel", "1.0.0", CHANNELS, NAMES, UNITS));
}

static void handle_command()
{
    switch (EF_TYPE(&rx)) {
    case EF_PING:
        if (EF_BODY_LEN(&rx) == 2)
            send_payload(ef_build_pong(payload, sizeof payload, ef_get_u16(EF_BODY(&rx)), micros()));
        break;
    case EF_SET_RATE:
        if (EF_BODY_LEN(&rx) == 4 && ef_get_f32(EF_BODY(&rx)) > 0.0f) {
            rate_hz = ef_get_f32(EF_BODY(&rx));
            filled = 0;
            send_hello(); /* the host learns the new rate from HELLO */
        }
        break;
    case EF_START: streaming = true; break;
    case EF_STOP: streaming = false; break;
    case EF_GET_HELLO: send_hello(); break;
    }
}

void setup()
{
    Serial.begin(115200);
    pinMode(BUTTON_PIN, INPUT_PULLUP);
    randomSeed(analogRead(A5));
    boot_id = (uint16_t)random(1, 65536);  /* changes across boots: the host counts resets */
    ef_decoder_init(&rx);
    send_hello();
    next_us = micros();
}

void loop()
{
    while (Serial.available() > 0)
        if (ef_decoder_feed(&rx, (uint8_t)Serial.read()) == EF_FRAME)
            handle_command();

    uint32_t now = micros();
    if (streaming && (int32_t)(now - next_us) >= 0) {
        if (filled == 0)
            block_t_us = now;
        block[filled * CHANNELS + 0] = (int16_t)(analogRead(A0) - 512);
        block[filled * CHANNELS + 1] = (int16_t)(analogRead(A1) - 512);
        block[filled * CHANNELS + 2] = (int16_t)(analogRead(A2) - 512);
        next_us += (uint32_t)(1e6f / rate_hz);
        if (++filled == BLOCK) {
            send_payload(ef_build_samples_i16(payload, sizeof payload, seq++, block_t_us, rate_hz, CHANNELS, BLOCK,
                                              block));
            filled = 0;
        }
    } else if (!streaming && now - last_beat_us > 1000000UL) {
        last_beat_us = now;
        send_payload(ef_build_heartbeat(payload, sizeof payload, now, 0));
    }

    bool down = digitalRead(BUTTON_PIN) == LOW;
    if (down && !button_was_down)
        send_payload(ef_build_label_int(payload, sizeof payload, now, 1));
    button_was_down = down;
}
