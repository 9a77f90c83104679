"""Model folders: find them, read their manifest, build their modules, hash their content.

A model folder (DESIGN.md, "A model folder") holds ``manifest.toml``, ``model.py``
(``Backbone`` and ``Head`` nn.Modules), ``weights.safetensors`` (keys prefixed
``backbone.`` and ``head.``), ``train.py`` and ``CARD.md``. Shipped models are found
by name in the repository's ``models/`` (when running from a checkout) or the installed
``edge_models`` package.

Reading a folder needs no torch: weights come back as numpy arrays (``arrays``), and
torch is imported only to build the modules (``build``, ``state_dicts``), so a daemon
serving a compiled artifact stays lean. A folder may also carry its backbone exported as
``model.onnx`` (``scripts/export-onnx.py`` writes it, recording the digest of the
``model.py`` and weights it came from); then a device that only serves needs no torch
at all: ONNX Runtime builds, gates and serves from that graph (``graph``).

What runs is what is pinned: a folder's files are read once (``ModelFolder.files``); the
pin (``check_pin``), the content hash, ``model.py``'s code and the weights all come from
those same bytes. ``model.py`` is compiled from them and executed into a fresh module,
so no bytecode is read from or written to ``__pycache__`` (Python's own importer would
run a planted ``.pyc`` whose header matches the source's mtime and size), and a file
changed after the pin was checked is never the one that runs.
"""
from __future__ import annotations

import hashlib
import linecache
import sys
import types
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from edge.errors import ModelError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

DEFAULT_MODEL = "vibration"
#: the exported backbone graph a folder may carry, and what it records about its source
GRAPH_FILE = "model.onnx"
GRAPH_SOURCES = ("model.py", "weights.safetensors")
GRAPH_SOURCE_KEY = "edge.source_sha256"


@dataclass(frozen=True)
class Manifest:
    """The typed content of ``manifest.toml``."""

    name: str
    version: str
    channels: int
    window: int
    sample_rate: float
    channel_names: tuple[str, ...]
    task: str  # "classification" | "forecast" | "regression"
    classes: tuple[str, ...]
    outputs: int  # classes for classification, horizon*channels (or 1) for regression
    feature_size: int
    head_kind: str
    parity: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    #: ``[serve]``: ``precision = "fp32"`` restricts serving to fp32 artifacts
    serve: dict[str, Any] = field(default_factory=dict)
    #: ``[eval]``: labelled check data (``generator`` or ``file``) for accuracy checks
    eval: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str) -> "Manifest":
        try:
            inp, task, feats, head = d["input"], d["task"], d["features"], d["head"]
            kind = task["kind"]
            classes = tuple(task.get("classes", ()))
            outputs = int(task.get("outputs", len(classes)))
            m = cls(
                name=str(d["name"]),
                version=str(d["version"]),
                channels=int(inp["channels"]),
                window=int(inp["window"]),
                sample_rate=float(inp["sample_rate"]),
                channel_names=tuple(inp.get("channel_names", [f"ch{i}" for i in range(int(inp["channels"]))])),
                task=str(kind),
                classes=classes,
                outputs=outputs,
                feature_size=int(feats["size"]),
                head_kind=str(head.get("kind", "linear")),
                parity=dict(d.get("parity", {})),
                calibration=dict(d.get("calibration", {})),
                serve=dict(d.get("serve", {})),
                eval=dict(d.get("eval", {})),
                metrics=dict(d.get("metrics", {})),
                raw=d,
            )
        except KeyError as e:
            raise ModelError(f"{where}: manifest is missing the key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelError(f"{where}: manifest has a bad value: {e}") from None
        if m.task not in ("classification", "forecast", "regression"):
            raise ModelError(f"{where}: task.kind {m.task!r} is not one of classification, forecast, regression")
        if m.task == "classification" and len(m.classes) < 2:
            raise ModelError(f"{where}: a classification task needs task.classes with at least 2 names")
        if m.channels < 1 or m.window < 2 or m.sample_rate <= 0 or m.feature_size < 1 or m.outputs < 1:
            raise ModelError(f"{where}: input.channels, input.window, input.sample_rate, features.size and outputs must be positive")
        if str(m.serve.get("precision", "auto")) not in ("auto", "fp32", "fp16", "int8"):
            raise ModelError(f"{where}: serve.precision {m.serve['precision']!r} is not one of auto, fp32, fp16, int8")
        if len(m.channel_names) != m.channels:
            raise ModelError(f"{where}: input.channel_names has {len(m.channel_names)} names for {m.channels} channels")
        return m


class ModelFolder:
    """One model folder on disk. Cheap to create; modules are built on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        mp = self.path / "manifest.toml"
        if not mp.is_file():
            raise ModelError(f"{self.path}: not a model folder (no manifest.toml)")
        self._manifest_bytes = mp.read_bytes()
        try:
            data = tomllib.loads(self._manifest_bytes.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{mp}: invalid TOML: {e}") from None
        self.manifest = Manifest.from_dict(data, where=str(mp))

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r})"

    @cached_property
    def files(self) -> dict[str, bytes]:
        """Every file of the folder (relative POSIX path -> bytes, no ``__pycache__``), read once:
        the pin, the content hash, the code that runs and the weights all come from these bytes."""
        files = read_folder(self.path)
        if files.get("manifest.toml") != self._manifest_bytes:
            raise ModelError(f"{self.path}: manifest.toml changed while the folder was being read; try again")
        return files

    @cached_property
    def content_hash(self) -> str:
        """sha256 over manifest, model code and weights: the key of compiled artifacts and the
        identity learner checkpoints are bound to.

        An exported ``model.onnx`` is left out on purpose: it is derived from ``model.py`` and
        the weights, and ``graph`` refuses one made from any others, so adding or re-exporting
        it changes nothing a checkpoint or an artifact depends on (a device upgraded to a
        folder that carries its graph keeps its learned head). The pin (``digest_files``)
        covers every file, the graph included."""
        h = hashlib.sha256()
        for name in ("manifest.toml", "model.py", "weights.safetensors"):
            h.update(name.encode())
            h.update(self.files.get(name, b""))
        return h.hexdigest()

    @cached_property
    def source_digest(self) -> str:
        """``digest_files`` of ``model.py`` and the weights: what an exported graph was made
        from, recorded in it (``graph``) so that a graph left stale by retraining is refused."""
        return digest_files({n: self.files.get(n, b"") for n in GRAPH_SOURCES})

    def graph(self) -> bytes | None:
        """The folder's exported backbone graph (``model.onnx``, input ``x``, output ``features``),
        or None if it carries none. Serving from it needs no torch (ONNX Runtime runs it).

        Refused (``ModelError``) unless the graph records the ``source_digest`` of this very
        ``model.py`` and weights: a graph from other weights would serve features the head
        was not trained on, and without torch nothing else could tell.
        """
        data = self.files.get(GRAPH_FILE)
        if data is None:
            return None
        meta = graph_metadata(data, where=f"{self.path}/{GRAPH_FILE}")
        made_from = meta.get(GRAPH_SOURCE_KEY, "")
        if made_from != self.source_digest:
            raise ModelError(f"{self.path}/{GRAPH_FILE} was exported from another model.py or weights "
                             f"({GRAPH_SOURCE_KEY} = {made_from[:16] or 'missing'}..., the folder's are "
                             f"{self.source_digest[:16]}...): export it again with "
                             f"`python scripts/export-onnx.py {self.path}` where torch is installed, or delete it")
        return data

    @cached_property
    def module(self):
        """The folder's ``model.py`` under a private, unique module name, executed from the
        bytes in ``files`` (those the pin covers); no bytecode is read or written."""
        src = self.path / "model.py"
        code_bytes = self.files.get("model.py")
        if code_bytes is None:
            raise ModelError(f"{self.path}: model folder has no model.py")
        modname = f"_edge_model_{self.content_hash[:12]}"
        if modname in sys.modules:  # the same content hash: the same bytes were executed before
            return sys.modules[modname]
        mod = types.ModuleType(modname)
        mod.__file__ = str(src)
        try:
            code = compile(code_bytes, str(src), "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:
            raise ModelError(f"{src}: importing model.py failed: {type(e).__name__}: {e}") from None
        # tracebacks and inspect.getsource show the executed text, not what is on disk now
        text = code_bytes.decode("utf-8", errors="replace")
        linecache.cache[str(src)] = (len(text), None, text.splitlines(True), str(src))
        sys.modules[modname] = mod  # classes defined there find their module (pickling, dataclasses)
        try:
            exec(code, mod.__dict__)
        except Exception as e:  # a user's model.py may fail in any way
            del sys.modules[modname]
            raise ModelError(f"{src}: importing model.py failed: {type(e).__name__}: {e}") from e
        for cls in ("Backbone", "Head"):
            if not hasattr(mod, cls):
                raise ModelError(f"{src}: model.py defines no {cls} class")
        return mod

    def arrays(self) -> tuple[dict, dict]:
        """(backbone, head) weights as numpy arrays, read with safetensors' numpy API (no torch)."""
        from safetensors.numpy import load

        wp = self.path / "weights.safetensors"
        data = self.files.get("weights.safetensors")
        if data is None:
            raise ModelError(f"{self.path}: model folder has no weights.safetensors (run its train.py)")
        try:
            tensors = load(data)
        except Exception as e:
            raise ModelError(f"{wp}: cannot read weights: {e}") from e
        bb = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        hd = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
        if not bb or not hd:
            raise ModelError(f"{wp}: weights need keys prefixed 'backbone.' and 'head.'")
        return bb, hd

    def state_dicts(self) -> tuple[dict, dict]:
        """(backbone, head) torch tensors: ``arrays`` converted, for ``load_state_dict``."""
        import torch

        bb, hd = self.arrays()
        return ({k: torch.from_numpy(v) for k, v in bb.items()}, {k: torch.from_numpy(v) for k, v in hd.items()})

    def build(self):
        """(backbone, head) nn.Modules in eval mode with the shipped weights loaded."""
        m = self.manifest
        bb = self.module.Backbone(m)
        hd = self.module.Head(m)
        bsd, hsd = self.state_dicts()
        try:
            bb.load_state_dict(bsd)
            hd.load_state_dict(hsd)
        except RuntimeError as e:
            raise ModelError(f"{self.path}: weights do not fit model.py: {e}") from e
        return bb.eval(), hd.eval()


def graph_metadata(data: bytes, *, where: str) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX graph (key -> value); ``ModelError`` if it is not one,
    or if its input and output are not the ``x`` and ``features`` every backend runs."""
    import onnx

    try:
        g = onnx.load_model_from_string(data)
    except Exception as e:  # onnx raises DecodeError and others for a damaged file
        raise ModelError(f"{where}: not a readable ONNX graph ({type(e).__name__}: {str(e)[:200]})") from None
    names = ([i.name for i in g.graph.input], [o.name for o in g.graph.output])
    if names[0][:1] != ["x"] or names[1] != ["features"]:
        raise ModelError(f"{where}: the graph's inputs {names[0][:4]} and outputs {names[1][:4]} are not "
                         f"['x'] and ['features'] (export it with scripts/export-onnx.py)")
    return {p.key: p.value for p in g.metadata_props}


def zoo_roots() -> list[Path]:
    """Where shipped models live: the repository's ``models/`` first, then ``edge_models``.

    A checkout (or a worktree) sees its own models even when another copy of the package
    is installed; a plain install has no ``models/`` next to ``edge`` and uses the
    installed ``edge_models`` distribution.
    """
    roots = []
    repo = Path(__file__).resolve().parent.parent / "models"
    if repo.is_dir():
        roots.append(repo)
    try:
        import edge_models  # installed (non-editable or editable) distribution

        installed = Path(edge_models.__file__).parent.resolve()
        if installed not in [r.resolve() for r in roots]:
            roots.append(installed)
    except ImportError:
        pass
    return roots


def shipped_models() -> dict[str, Path]:
    """Name -> folder of every shipped model."""
    out: dict[str, Path] = {}
    for root in zoo_roots():
        for p in sorted(root.iterdir()):
            if (p / "manifest.toml").is_file():
                out.setdefault(p.name, p)
    return out


def read_folder(path: str | Path) -> dict[str, bytes]:
    """Every file under ``path`` but ``__pycache__``: relative POSIX path -> bytes.

    ``__pycache__`` stays out because nothing there is ever executed (``ModelFolder.module``
    compiles ``model.py`` from its source bytes), and Python rewrites it at will.
    """
    root = Path(path)
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.relative_to(root).parts}


def digest_files(files: dict[str, bytes]) -> str:
    """sha256 over a folder's files (relative paths and contents, in path order): what
    ``[model] sha256`` pins. Each path and content is length-prefixed, so no two folders
    share a digest by moving bytes between a name and a content.

    >>> a = digest_files({"model.py": b"x = 1", "manifest.toml": b"name = 'x'"})
    >>> a == digest_files({"manifest.toml": b"name = 'x'", "model.py": b"x = 1"}), len(a)
    (True, 64)
    >>> a == digest_files({"model.py": b"x = 2", "manifest.toml": b"name = 'x'"})
    False
    """
    h = hashlib.sha256()
    for rel in sorted(files, key=lambda r: r.split("/")):  # by path parts, as pins made before sorted them
        name, data = rel.encode(), files[rel]
        h.update(len(name).to_bytes(4, "big") + name + len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def folder_digest(path: str | Path) -> str:
    """``digest_files`` of a folder on disk (``edge pin``), the same value ``check_pin`` checks.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "manifest.toml").write_text("name = 'x'")
    >>> folder_digest(d) == digest_files({"manifest.toml": b"name = 'x'"})
    True
    """
    return digest_files(read_folder(path))


def check_pin(model: "ModelFolder", expected: str) -> None:
    """Refuse a model folder whose content is not the pinned one (before any of its code runs).

    The digest is taken over ``model.files``: the very bytes its code and weights are then
    loaded from, so a file swapped after this check is never the one that runs.
    """
    if not expected:
        return
    got = digest_files(model.files)
    if got != expected.strip().lower():
        raise ModelError(f"model folder {model.path} does not match [model] sha256 = {expected[:16]}... "
                         f"(its content is {got[:16]}...): refusing to load code that is not the pinned one")


def resolve_model(ref: str | Path | None) -> ModelFolder:
    """A model folder from a path, a shipped model's name, or None for the default model."""
    ref = DEFAULT_MODEL if ref is None or str(ref) == "" else ref
    p = Path(ref).expanduser()
    if (p / "manifest.toml").is_file():
        return ModelFolder(p)
    shipped = shipped_models()
    if str(ref) in shipped:
        return ModelFolder(shipped[str(ref)])
    raise ModelError(
        f"model {str(ref)!r} is neither a model folder nor a shipped model "
        f"(shipped: {', '.join(sorted(shipped)) or 'none'})"
    )


def save_weights(folder: str | Path, backbone, head) -> tuple[int, int]:
    """Write ``weights.safetensors`` (keys ``backbone.*`` and ``head.*``) into a model folder.

    Returns (parameters, bytes written): what a training recipe reports in its card.
    """
    from safetensors.torch import save_file

    path = Path(folder) / "weights.safetensors"
    tensors = {f"backbone.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    tensors.update({f"head.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(tensors, str(path))
    n_params = sum(p.numel() for p in backbone.parameters()) + sum(p.numel() for p in head.parameters())
    return n_params, path.stat().st_size


def write_metrics(folder: str | Path, metrics: dict[str, Any], card_block: str) -> None:
    """Replace the manifest's ``[metrics]`` table and the CARD's block between
    ``<!-- metrics:start`` and ``<!-- metrics:end -->`` (both written by ``train.py``)."""
    import re

    folder = Path(folder)
    mp = folder / "manifest.toml"
    text = mp.read_text().split("[metrics]")[0].rstrip() + "\n\n[metrics]\n"
    text += "".join(f"{k} = {v!r}\n" for k, v in metrics.items())
    mp.write_text(text)
    card = folder / "CARD.md"
    if card.exists():
        block = f"<!-- metrics:start (written by train.py) -->\n{card_block}\n<!-- metrics:end -->"
        card.write_text(re.sub(r"<!-- metrics:start.*?<!-- metrics:end -->", lambda _: block, card.read_text(), flags=re.S))


SERVING_START, SERVING_END = "<!-- serving:start", "<!-- serving:end -->"


def write_serving_card(folder: str | Path, block: str, *, heading: str = "## int8 (filled by `edge bench serve`)") -> None:
    """Put ``block`` into CARD.md between ``<!-- serving:start`` and ``<!-- serving:end -->``.

    The first time, the block goes at the top of the ``heading`` section, replacing its
    "Not measured yet" sentence and keeping any other notes below it; later it replaces
    only what is between the markers, so text written by hand around them survives.
    """
    import re

    card = Path(folder) / "CARD.md"
    text = card.read_text() if card.exists() else ""
    wrapped = f"{SERVING_START} (written by edge bench serve --write-card) -->\n{block.rstrip()}\n{SERVING_END}"
    if SERVING_START in text:
        text = re.sub(r"<!-- serving:start.*?<!-- serving:end -->", lambda _: wrapped, text, flags=re.S)
    elif heading in text:
        head, rest = text.split(heading, 1)
        nxt = rest.find("\n## ")
        body, tail = (rest[:nxt], rest[nxt:]) if nxt >= 0 else (rest, "\n")
        # the placeholder sentence goes; any hand-written notes after it stay, below the block
        body = re.sub(r"Not measured yet.*?\.(\s+|$)", "", body, count=1, flags=re.S).strip()
        text = f"{head}{heading}\n{wrapped}\n" + (f"\n{body}\n" if body else "") + tail
    else:
        text = text.rstrip() + f"\n\n{heading}\n{wrapped}\n"
    card.write_text(text)
