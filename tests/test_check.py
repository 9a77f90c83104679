"""`edge run --check` fails, with the documented exit code and one line, wherever start-up would.

Each case is a real file on disk (a copied model folder, a generated key, a config in
Latin-1) run through the real CLI entry point.
"""
from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from edge.check import check_tls_files
from edge.cli import main
from edge.config import MqttConfig, load_config
from edge.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "vibration"  # this tree's model, not the installed edge_models
pytestmark = pytest.mark.timeout(120)


def _config(tmp_path: Path, body: str = "", *, model: Path = MODEL) -> Path:
    p = tmp_path / "edge.toml"
    p.write_text(f'[node]\nstate_dir = "{tmp_path / "state"}"\n[model]\npath = "{model}"\n{body}')
    return p


def _check(capsys, cfg: Path) -> tuple[int, str]:
    rc = main(["run", "--config", str(cfg), "--check"])
    cap = capsys.readouterr()
    return rc, cap.err


@pytest.fixture
def model_copy(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(MODEL, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_check_passes_on_the_shipped_model(tmp_path, capsys):
    rc = main(["run", "--config", str(_config(tmp_path)), "--check"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "OK" in out and "vibration@" in out and "(1, 3, 256)" in out


def test_check_refuses_a_model_folder_without_weights(tmp_path, capsys, model_copy):
    (model_copy / "weights.safetensors").unlink()
    rc, err = _check(capsys, _config(tmp_path, model=model_copy))
    assert rc == 3
    assert "no weights.safetensors" in err and err.count("\n") == 1


def test_check_refuses_a_model_py_that_does_not_import(tmp_path, capsys, model_copy):
    (model_copy / "model.py").write_text("import a_module_that_does_not_exist\n")
    rc, err = _check(capsys, _config(tmp_path, model=model_copy))
    assert rc == 3
    assert "importing model.py failed" in err and "ModuleNotFoundError" in err


def test_check_refuses_weights_that_do_not_fit(tmp_path, capsys, model_copy):
    other = ROOT / "models" / "forecast" / "weights.safetensors"
    shutil.copy(other, model_copy / "weights.safetensors")
    rc, err = _check(capsys, _config(tmp_path, model=model_copy))
    assert rc == 3
    assert "weights do not fit model.py" in err or "cannot read weights" in err


def test_check_refuses_a_manifest_whose_shapes_the_model_does_not_produce(tmp_path, capsys, model_copy):
    mp = model_copy / "manifest.toml"
    text = mp.read_text()
    size = load_feature_size(text)
    mp.write_text(text.replace(f"size = {size}", f"size = {size + 1}", 1))
    rc, err = _check(capsys, _config(tmp_path, model=model_copy))
    assert rc == 3
    assert "features of shape" in err or "weights do not fit" in err
    assert err.count("\n") == 1  # torch's multi-line message is folded into one line


def load_feature_size(manifest_text: str) -> int:
    import tomllib

    return int(tomllib.loads(manifest_text)["features"]["size"])


def test_check_refuses_a_model_whose_forward_fails(tmp_path, capsys, model_copy):
    src = (model_copy / "model.py").read_text()
    (model_copy / "model.py").write_text(src + "\n\ndef _boom(self, x):\n    raise RuntimeError('bad conv')\n\nBackbone.forward = _boom\n")
    rc, err = _check(capsys, _config(tmp_path, model=model_copy))
    assert rc == 3
    assert "does not run through the model" in err and "bad conv" in err


def test_non_utf8_config_is_a_clear_error(tmp_path, capsys):
    p = tmp_path / "edge.toml"
    p.write_bytes('[node]\nname = "presse-n°7"\n'.encode("latin-1"))
    rc, err = _check(capsys, p)
    assert rc == 2
    assert "not UTF-8 text" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["123", "1.5", "true", "[1, 2]", "{ a = 987654 }", "1979-05-27"])
def test_a_wrongly_typed_password_is_never_echoed(tmp_path, capsys, value):
    rc, err = _check(capsys, _config(tmp_path, f"[mqtt]\npassword = {value}\n"))
    assert rc == 2
    assert "[mqtt] password = <hidden> is invalid" in err
    for token in ("123", "1.5", "987654", "1979"):
        assert token not in err


def test_the_password_is_not_in_the_config_repr():
    cfg = MqttConfig(username="u", password="s3cret-value")
    assert "s3cret-value" not in repr(cfg)


def test_password_file_is_read_and_a_readable_one_warned_about(tmp_path, caplog):
    secret = tmp_path / "mqtt.password"
    secret.write_text("s3cret-value\n")
    secret.chmod(0o644)
    cfg = load_config(_config(tmp_path, f'[mqtt]\nusername = "u"\npassword_file = "{secret}"\n'))
    assert cfg.mqtt.password == "s3cret-value"
    assert any("chmod 600" in r.getMessage() for r in caplog.records)
    assert not any("s3cret-value" in r.getMessage() for r in caplog.records)


def test_a_private_password_file_gives_no_warning(tmp_path, caplog):
    secret = tmp_path / "mqtt.password"
    secret.write_text("s3cret-value")
    secret.chmod(0o600)
    cfg = load_config(_config(tmp_path, f'[mqtt]\nusername = "u"\npassword_file = "{secret}"\n'))
    assert cfg.mqtt.password == "s3cret-value" and not caplog.records


def test_password_and_password_file_together_are_refused(tmp_path, capsys):
    secret = tmp_path / "mqtt.password"
    secret.write_text("a")
    rc, err = _check(capsys, _config(tmp_path, f'[mqtt]\npassword = "b-secret"\npassword_file = "{secret}"\n'))
    assert rc == 2 and "both set" in err and "b-secret" not in err


def test_plaintext_to_a_remote_broker_is_refused(tmp_path, capsys):
    rc, err = _check(capsys, _config(tmp_path, '[mqtt]\nhost = "192.0.2.10"\nusername = "u"\npassword = "pw-xyz"\n'))
    assert rc == 2
    assert "not on loopback and tls = false" in err and "pw-xyz" not in err


def test_plaintext_to_a_remote_broker_passes_when_allowed(tmp_path, capsys):
    rc = main(["run", "--config", str(_config(tmp_path, '[mqtt]\nhost = "192.0.2.10"\nallow_plaintext = true\n')), "--check"])
    assert rc == 0, capsys.readouterr().err


def test_a_state_dir_under_a_file_is_a_state_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    p = tmp_path / "edge.toml"
    p.write_text(f'[node]\nstate_dir = "{tmp_path / "afile" / "state"}"\n[model]\npath = "{MODEL}"\n')
    rc, err = _check(capsys, p)
    assert rc == 7 and "is not a folder" in err


# --- TLS files ---------------------------------------------------------------------------

def _key_and_cert(tmp_path: Path, name: str, *, encrypt: bytes | None = None) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    enc = serialization.BestAvailableEncryption(encrypt) if encrypt else serialization.NoEncryption()
    kp, cp = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.chmod(0o600)
    return kp, cp


def test_good_tls_files_pass(tmp_path):
    key, cert = _key_and_cert(tmp_path, "node")
    _, ca = _key_and_cert(tmp_path, "ca")
    check_tls_files(MqttConfig(tls=True, ca_file=str(ca), cert_file=str(cert), key_file=str(key)))


def test_a_garbage_key_file_is_one_line_with_exit_code_2(tmp_path, capsys):
    _, cert = _key_and_cert(tmp_path, "node")
    bad = tmp_path / "bad.key"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    rc, err = _check(capsys, _config(tmp_path, f'[mqtt]\ntls = true\ncert_file = "{cert}"\nkey_file = "{bad}"\n'))
    assert rc == 2
    assert err.startswith("edge: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert "key_file" in err and "not base64" not in err


def test_a_key_that_does_not_match_its_certificate_is_refused(tmp_path):
    _, cert = _key_and_cert(tmp_path, "node")
    other_key, _ = _key_and_cert(tmp_path, "other")
    with pytest.raises(ConfigError, match="cannot be used with cert_file"):
        check_tls_files(MqttConfig(tls=True, cert_file=str(cert), key_file=str(other_key)))


def test_a_file_that_is_not_a_key_is_refused(tmp_path):
    _, cert = _key_and_cert(tmp_path, "node")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        check_tls_files(MqttConfig(tls=True, cert_file=str(cert), key_file=str(cert)))


def test_an_encrypted_key_is_refused_without_a_prompt(tmp_path):
    key, cert = _key_and_cert(tmp_path, "node", encrypt=b"passphrase")
    with pytest.raises(ConfigError, match="the key is encrypted"):
        check_tls_files(MqttConfig(tls=True, cert_file=str(cert), key_file=str(key)))


def test_a_garbage_ca_file_is_refused(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"\[mqtt\] ca_file = .* not a PEM CA bundle"):
        check_tls_files(MqttConfig(tls=True, ca_file=str(ca)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, so an unreadable key cannot be made here")
def test_an_unreadable_key_file_is_refused(tmp_path):
    key, cert = _key_and_cert(tmp_path, "node")
    key.chmod(0)
    with pytest.raises(ConfigError, match="cannot read it: Permission denied"):
        check_tls_files(MqttConfig(tls=True, cert_file=str(cert), key_file=str(key)))


# --- the command itself ------------------------------------------------------------------

def test_bad_key_through_the_real_command_exits_2_without_a_traceback(tmp_path):
    _, cert = _key_and_cert(tmp_path, "node")
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"\x00\x01garbage")
    cfg = _config(tmp_path, f'[mqtt]\ntls = true\ncert_file = "{cert}"\nkey_file = "{bad}"\n')
    r = subprocess.run([sys.executable, "-m", "edge.cli", "run", "--config", str(cfg), "--check"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "key_file" in r.stderr


def test_version_prints_the_package_version(capsys):
    from edge import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip().startswith("edge-runtime ")
    assert __version__


# --- what `edge run` itself checks before it starts ----------------------------------------

def test_run_refuses_a_model_folder_without_weights_with_exit_3(tmp_path, capsys, model_copy):
    (model_copy / "weights.safetensors").unlink()
    rc = main(["run", "--config", str(_config(tmp_path, model=model_copy))])
    assert rc == 3 and "no weights.safetensors" in capsys.readouterr().err


def test_run_refuses_unreadable_weights_with_exit_3(tmp_path, capsys, model_copy):
    (model_copy / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    rc = main(["run", "--config", str(_config(tmp_path, model=model_copy))])
    assert rc == 3 and "cannot read weights" in capsys.readouterr().err


def test_run_refuses_plaintext_to_a_remote_broker_with_exit_2(tmp_path, capsys):
    rc = main(["run", "--config", str(_config(tmp_path, '[mqtt]\nhost = "192.0.2.10"\n'))])
    assert rc == 2 and "not on loopback" in capsys.readouterr().err


def test_start_up_checks_do_not_import_torch(tmp_path):
    # The serving path is meant to run without torch (RSS); the checks must not pull it in.
    code = ("import sys; from edge.check import check_startup; from edge.config import load_config; "
            f"check_startup(load_config({str(_config(tmp_path))!r})); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"


_TOML_VALUES = st.recursive(
    st.integers() | st.floats(allow_nan=False) | st.booleans() | st.dates() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(min_size=1, max_size=5), inner, max_size=3),
    max_leaves=8)


@given(_TOML_VALUES.filter(lambda v: not isinstance(v, str)))
def test_a_secret_of_any_wrong_type_gives_the_same_message(value):
    from edge.config import parse_config

    with pytest.raises(ConfigError) as e:
        parse_config({"mqtt": {"password": value}})
    assert str(e.value) == "[mqtt] password = <hidden> is invalid: expected a string"


def test_edge_run_exits_3_when_the_model_code_does_not_import(tmp_path):
    """Not only --check: the daemon itself reports a broken model folder as a model error (exit 3),
    which the unit's RestartPreventExitStatus keeps from restarting in a loop."""
    import shutil
    import subprocess
    import sys

    from edge.zoo import resolve_model

    folder = tmp_path / "broken"
    shutil.copytree(resolve_model("vibration").path, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "model.py").write_text("raise RuntimeError('this model folder is broken')\n")
    conf = tmp_path / "edge.toml"
    conf.write_text(f'[node]\nname = "b"\nstate_dir = "{tmp_path / "state"}"\n'
                    f'[model]\npath = "{folder}"\ncache_dir = "{tmp_path / "cache"}"\n')
    r = subprocess.run([sys.executable, "-m", "edge.cli", "run", "--config", str(conf)], capture_output=True, text=True,
                       timeout=240, cwd=tmp_path)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "importing model.py failed" in r.stderr.splitlines()[-1]


# --- --check makes every key load of start-up, with the run's exit codes -------------------

def _both(tmp_path: Path, cfg: Path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """(`edge run --check`, `edge run`) on the same config, as real processes."""
    def edge(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edge.cli", "run", "--config", str(cfg), *extra],
                              capture_output=True, text=True, timeout=100, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    return edge("--check"), edge()


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_check_refuses_a_missing_or_empty_labels_keys_dir_as_run_does(tmp_path, make):
    keys = tmp_path / "labellers"
    if make == "empty":
        keys.mkdir()
    check, run = _both(tmp_path, _config(tmp_path, f'[labels]\nkeys_dir = "{keys}"\n'))
    assert check.returncode == run.returncode == 2, (check.stderr[-1000:], run.stderr[-1000:])
    assert "[labels] keys_dir" in check.stderr.splitlines()[-1]
    assert check.stderr.splitlines()[-1] == run.stderr.splitlines()[-1]


def test_check_refuses_a_missing_fleet_key_file_with_exit_9_as_run_does(tmp_path):
    from edge.fleet.keys import create_key

    server = create_key(tmp_path / "keys", "srv", role="server")
    body = (f'[fleet]\nenabled = true\nkey_file = "{tmp_path / "keys" / "gone.device.key"}"\n'
            f'server_key = "{server.public_path}"\n')
    check, run = _both(tmp_path, _config(tmp_path, body))
    assert check.returncode == run.returncode == 9, (check.stderr[-1000:], run.stderr[-1000:])
    assert "gone.device.key" in check.stderr.splitlines()[-1]
