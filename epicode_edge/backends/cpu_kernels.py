"""Which CPU kernels llama.cpp runs our models with: its extra buffer types (AMX tiles, repacked weights) or plain.

llama-cpp-python compiles llama.cpp with the build machine's CPU flags, so where the CPU reports AMX the AMX
kernels are built in, and at load llama.cpp moves Q4_0/Q4_1/Q8_0/K-quant weights into them (and, on AVX2/
AVX-512/ARM, into repacked layouts). On some VMs that report AMX without full hypervisor support, the first
multi-token decode then dies with SIGILL in ggml_backend_amx_mul_mat, taking the whole process with it. No
static CPU-flag check can tell a working AMX from a broken one: only running the kernel decides.

So, once per llama.cpp build and CPU, `probe()` runs a child process that quantizes a tiny model to Q8_0, Q4_0
and Q4_K_M, loads each with the extra buffer types and runs a prefill and a step, comparing the logits with the
plain kernels'. `decide()` loads models with the extra buffer types only where that child survived with the same
results; the probe's result is cached in the user cache folder, so it costs nothing after the first run.

The setting: `set_mode("auto" | "on" | "off")`, else $EPICODE_EDGE_CPU_REPACK, else "auto" (probe).
Every llama.cpp model this package loads goes through `open_llama()`, which applies the decision.

    python -m epicode_edge.backends.cpu_kernels probe    # the probe child: a line per stage, exit 0 = pass
    python -m epicode_edge.backends.cpu_kernels smoke    # the same models with the decided kernels only
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import BackendError, ParameterError
from ..userdirs import cache_dir

MODULE = "epicode_edge.backends.cpu_kernels"  # the children run `python -m MODULE probe|smoke`
MODES = ("auto", "on", "off")
ENV = "EPICODE_EDGE_CPU_REPACK"
PROBE_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")  # AMX and repack kernels exist for these (and more) on x86
PROBE_TIMEOUT = 180.0  # seconds; a hung child counts as a failed probe
CACHE_FILE = "cpu-probe.json"
PROBE_VERSION = 1  # bump when the probe changes, so that cached results are not reused
WRONG_RESULTS = 4  # the child's exit code when the extra kernels ran but gave non-finite or different logits

_state = {"mode": None, "via": "set_mode"}  # set_mode()'s value (None: the environment decides) and who set it
_decisions: dict[str, "Decision"] = {}  # per mode, once per process
_lock = threading.Lock()


@dataclass
class ProbeResult:
    """What the probe child did: `ok` when every stage passed."""

    ok: bool
    detail: str                    # one line: what passed, or what died and how
    passed: list = field(default_factory=list)  # stages that passed, e.g. ["Q8_0", "Q4_0"]
    failed_stage: str | None = None
    returncode: int | None = None  # negative: killed by that signal
    seconds: float = 0.0
    key: str = ""                  # the llama.cpp build and CPU it holds for
    cached: bool = False           # read from the cache file rather than run now

    @property
    def about_kernels(self) -> bool:
        """Whether the verdict is about the kernels (passed, killed by a signal, hung, wrong logits), rather
        than a child that could not run at all (an import error, say): only such verdicts are cached."""
        return self.ok or self.returncode is None or self.returncode < 0 or self.returncode == WRONG_RESULTS


@dataclass(frozen=True)
class Decision:
    """How models are loaded: with llama.cpp's extra CPU buffer types (AMX, repack) or without, and why."""

    use_extra_bufts: bool
    mode: str                      # auto | on | off
    source: str                    # where the mode came from: "default", "environment", "set_mode", "option"
    reason: str                    # one line
    probe: ProbeResult | None = None

    @property
    def kernels(self) -> str:
        return "extra buffer types (AMX / repacked weights where the CPU has them)" if self.use_extra_bufts \
            else "plain CPU kernels (extra buffer types off)"

    def describe(self) -> str:
        return f"llama.cpp CPU kernels: {self.kernels}; {self.reason}"


# -- the setting -----------------------------------------------------------------------------------


def check_mode(mode: str, what: str = "cpu repack mode") -> str:
    if mode not in MODES:
        raise ParameterError(f"{what} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def set_mode(mode: str | None, via: str = "set_mode") -> None:
    """Force the CPU kernels for this process: "on", "off", or "auto" (probe); None: back to $EPICODE_EDGE_CPU_REPACK.
    Applies to models loaded after the call. via: who set it, for the reason shown ("set_mode" for the Python
    API, "option" for the CLI's --cpu-repack)."""
    if mode is not None:
        check_mode(mode)
    _state["mode"], _state["via"] = mode, via


def current_mode() -> tuple[str, str]:
    """(mode, where it came from)."""
    if _state["mode"] is not None:
        return _state["mode"], _state["via"]
    env = os.environ.get(ENV, "").strip().lower()
    if env:
        return check_mode(env, f"${ENV}"), "environment"
    return "auto", "default"


def supported() -> bool:
    """Whether this llama-cpp-python can load a model without the extra buffer types."""
    import llama_cpp

    return any(name == "use_extra_bufts" for name, *_ in llama_cpp.llama_model_params._fields_)


def decide(refresh: bool = False) -> Decision:
    """The decision for models loaded now (probing once per llama.cpp build and CPU in "auto" mode).
    refresh=True runs the probe again, ignoring the cached result."""
    mode, source = current_mode()
    with _lock:
        if not refresh and mode in _decisions and _decisions[mode].source == source:
            return _decisions[mode]
        d = _decide(mode, source, refresh)
        _decisions[mode] = d
        return d


def _decide(mode: str, source: str, refresh: bool) -> Decision:
    how = {"set_mode": "set by the Python API", "option": "set by --cpu-repack", "environment": f"set by ${ENV}",
           "default": "the default"}[source]
    if not supported():
        return Decision(True, mode, source, "this llama-cpp-python cannot turn the extra buffer types off "
                                            "(it predates llama.cpp's use_extra_bufts model parameter)")
    if mode == "on":
        return Decision(True, mode, source, f"forced on ({how})")
    if mode == "off":
        return Decision(False, mode, source, f"forced off ({how})")
    result = cached_probe(refresh=refresh)
    if result.ok:
        when = "cached probe" if result.cached else "probe"
        return Decision(True, mode, source, f"{when} passed on this CPU ({result.detail})", result)
    return Decision(False, mode, source, f"probe failed on this CPU: {result.detail}; "
                                         f"{ENV}=on forces them", result)


# -- loading ---------------------------------------------------------------------------------------


def open_llama(model_path, decision: Decision | None = None, **kwargs):
    """`llama_cpp.Llama(model_path, **kwargs)` loaded with the CPU kernels `decide()` chose (or `decision`).

    The model's chat templates are not compiled by llama-cpp-python (its create_chat_completion is not used
    here: the runtime renders templates itself, sandboxed and bounded), so a model whose template is broken
    still loads and answers raw prompts."""
    import llama_cpp
    import llama_cpp.llama_chat_format as chat_format
    import llama_cpp.llama_cpp as lowlevel

    decision = decision or decide()
    with _lock:  # the high-level class takes its model parameters from llama_model_default_params()
        default_params, formatter = lowlevel.llama_model_default_params, chat_format.Jinja2ChatFormatter

        def params():
            p = default_params()
            if supported():
                p.use_extra_bufts = decision.use_extra_bufts
            return p

        lowlevel.llama_model_default_params = params
        chat_format.Jinja2ChatFormatter = _UncompiledTemplate
        try:
            llm = llama_cpp.Llama(model_path=str(model_path), **kwargs)
        finally:
            lowlevel.llama_model_default_params = default_params
            chat_format.Jinja2ChatFormatter = formatter
    if not supported():
        return llm
    if bool(llm.model_params.use_extra_bufts) != decision.use_extra_bufts:  # a changed llama-cpp-python
        llm.close()
        raise BackendError(f"{model_path}: llama-cpp-python ignored the CPU kernel setting (use_extra_bufts)")
    return llm


class _UncompiledTemplate:
    """Stands in for llama-cpp-python's Jinja2ChatFormatter while a model loads (see open_llama)."""

    def __init__(self, *args, **kwargs):
        pass

    def to_chat_handler(self):
        def handler(*args, **kwargs):
            raise BackendError("chat completion through llama-cpp-python is not available on models loaded by "
                               "epicode-edge: use its runtime (Runtime.generate / chat), which renders the template")

        return handler


# -- the probe -------------------------------------------------------------------------------------


def build_key() -> str:
    """A hash of what the probe's verdict depends on: the llama.cpp libraries and the CPU."""
    import llama_cpp
    import llama_cpp.llama_cpp as lowlevel

    parts = [f"probe {PROBE_VERSION}", f"llama-cpp-python {llama_cpp.__version__}", platform.machine(),
             lowlevel.llama_print_system_info().decode("utf-8", "replace"), cpu_name(), " ".join(cpu_flags())]
    lib = Path(getattr(lowlevel._lib, "_name", "") or "")
    if lib.is_file():
        for f in sorted(lib.parent.iterdir()):
            if f.is_file() and (".so" in f.name or f.suffix in (".dylib", ".dll")):
                st = f.stat()
                parts.append(f"{f} {st.st_size} {st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def cached_probe(refresh: bool = False, argv: list[str] | None = None) -> ProbeResult:
    """The probe's result for this llama.cpp build and CPU: from the cache file, else run now (`probe(argv)`)
    and stored when it is a verdict about the kernels."""
    key = build_key()
    path = cache_dir() / CACHE_FILE
    records = _read_cache(path)
    if not refresh and key in records:
        try:
            return ProbeResult(**{**records[key], "cached": True})
        except TypeError:
            pass  # an old or hand-edited record: probe again
    result = probe(argv)
    result.key = key
    if result.about_kernels:
        records[key] = {k: v for k, v in asdict(result).items() if k != "cached"}
        _write_cache(path, records)
    return result


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, records: dict) -> None:
    """Atomically; a cache that cannot be written is not an error (the probe runs again next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(dict(list(records.items())[-16:]), f, indent=1)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


def probe(argv: list[str] | None = None, timeout: float = PROBE_TIMEOUT) -> ProbeResult:
    """Run the probe child (`argv`, default: this module's `probe` command) and read its verdict: exit 0 with
    every stage passed, or the stage it died in and how (signal, exit code, time-out)."""
    result = run_child(argv or [sys.executable, "-m", MODULE, "probe"], timeout, {ENV: "on"})
    if result.ok:
        result.detail += ", same logits as the plain kernels"
    return result


def smoke_check(timeout: float = PROBE_TIMEOUT) -> ProbeResult:
    """Prefill and step Q8_0, Q4_0 and Q4_K_M models with the kernels `decide()` picks, in a child process:
    what a test suite runs first, so that an engine crash stops it with one line instead of killing it."""
    return run_child([sys.executable, "-m", MODULE, "smoke"], timeout, {})


def run_child(argv: list[str], timeout: float, env: dict) -> ProbeResult:
    """Run a check child that prints `stage NAME` before each stage and `passed NAME` after it; exit 0 = pass."""
    env = {**os.environ, **env}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL)
        out, rc = p.stdout, p.returncode
        tail = (p.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode("utf-8", "replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, tail = None, ""
    seconds = round(time.perf_counter() - t0, 2)
    passed, stage = [], None
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        if word == "stage":
            stage = rest.strip()
        elif word == "passed":
            passed.append(rest.strip())
    if rc == 0:
        return ProbeResult(True, f"{', '.join(passed) or 'all'} prefill and step in {seconds:.1f} s", passed,
                           None, rc, seconds)
    if rc is None:
        how = f"timed out after {timeout:.0f} s"
    elif rc < 0:
        how = f"killed by {_signal_name(-rc)}"
    else:
        how = f"exited with code {rc}" + (f" ({tail.strip()[:200]})" if tail.strip() else "")
    where = f" in stage '{stage}'" if stage else ""
    return ProbeResult(False, f"llama.cpp{where} {how}", passed, stage, rc, seconds)


def _signal_name(n: int) -> str:
    try:
        s = signal.Signals(n)
        return f"{s.name} ({signal.strsignal(s) or s.name})"
    except ValueError:
        return f"signal {n}"


# -- the child ---------------------------------------------------------------------------------------

N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER = 256, 512, 4, 2, 2  # rows and columns multiples of 32 and 256:
N_VOCAB = 288                                                  # the AMX and K-quant kernels take them


def write_probe_model(path: Path) -> Path:
    """A tiny random F32 Llama GGUF (SentencePiece vocabulary with byte tokens, 2 layers, GQA)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(N_VOCAB - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
        [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (N_VOCAB - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * N_VOCAB)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def mat(rows, cols):  # (rows, cols) float32
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    head = N_EMBD // N_HEAD
    w.add_tensor("token_embd.weight", mat(N_VOCAB, N_EMBD))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    w.add_tensor("output.weight", mat(N_VOCAB, N_EMBD))
    for i in range(N_LAYER):
        for name, shape in (("attn_q", (N_EMBD, N_EMBD)), ("attn_k", (head * N_HEAD_KV, N_EMBD)),
                            ("attn_v", (head * N_HEAD_KV, N_EMBD)), ("attn_output", (N_EMBD, N_EMBD)),
                            ("ffn_gate", (N_FF, N_EMBD)), ("ffn_up", (N_FF, N_EMBD)),
                            ("ffn_down", (N_EMBD, N_FF))):
            w.add_tensor(f"blk.{i}.{name}.weight", mat(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run_model(path: Path, use_extra_bufts: bool, prompt: list[int], n_threads: int):
    """Prefill `prompt`, then step one token; the two logit vectors (V,) float32."""
    import llama_cpp
    import numpy as np

    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = use_extra_bufts
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise RuntimeError(f"{path}: llama.cpp cannot load the probe model")
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 64
    cp.n_threads = cp.n_threads_batch = n_threads
    ctx = llama_cpp.llama_init_from_model(model, cp)
    out = []
    try:
        for ids in (prompt, [prompt[0]]):
            arr = (llama_cpp.llama_token * len(ids))(*ids)
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(ids))) != 0:
                raise RuntimeError("llama_decode failed")
            out.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(N_VOCAB,)).copy())
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return out


def _child(smoke: bool) -> int:
    """The probe child (smoke=False): quantize, load with and without the extra buffer types, prefill and step,
    compare. The smoke child: the same models with the kernels decide() picks only."""
    import llama_cpp  # before numpy: CUDA builds segfaulted at model load otherwise
    import numpy as np

    def quiet(level, text, user_data):
        pass

    cb = llama_cpp.llama_log_callback(quiet)
    llama_cpp.llama_log_set(cb, None)
    n_threads = min(4, os.cpu_count() or 1)
    prompt = [1] + [(7 * i + 3) % (N_VOCAB - 3) + 3 for i in range(15)]  # 16 tokens: a multi-token GEMM
    if smoke:
        d = decide()
        print(f"decision {int(d.use_extra_bufts)} {d.reason}", flush=True)
    with tempfile.TemporaryDirectory(prefix="epicode-probe-") as tmp:
        f32 = write_probe_model(Path(tmp) / "probe-F32.gguf")
        for name in PROBE_TYPES:
            print(f"stage {name} quantize", flush=True)
            dst = Path(tmp) / f"probe-{name}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
            if llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), params) != 0:
                print(f"quantizing to {name} failed", file=sys.stderr)
                return 3
            if smoke:
                print(f"stage {name} prefill and step", flush=True)
                if not all(np.isfinite(x).all() for x in run_model(dst, d.use_extra_bufts, prompt, n_threads)):
                    print(f"{name}: non-finite logits", file=sys.stderr)
                    return WRONG_RESULTS
                print(f"passed {name}", flush=True)
                continue
            print(f"stage {name} plain kernels", flush=True)
            ref = run_model(dst, False, prompt, n_threads)
            print(f"stage {name} extra buffer types", flush=True)
            got = run_model(dst, True, prompt, n_threads)
            for r, g, what in zip(ref, got, ("prefill", "step")):
                if not np.isfinite(g).all():
                    print(f"{name} {what}: non-finite logits with the extra buffer types", file=sys.stderr)
                    return WRONG_RESULTS
                err = float(np.max(np.abs(r - g)) / (np.max(np.abs(r)) + 1e-6))
                if err > 0.05:
                    print(f"{name} {what}: logits differ from the plain kernels' (relative {err:.3g})",
                          file=sys.stderr)
                    return WRONG_RESULTS
            print(f"passed {name}", flush=True)
    return 0


# -- system facts (for `epicode-edge doctor`) ---------------------------------------------------------


def cpu_name() -> str:
    for line in _cpuinfo_lines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's feature flags as the kernel reports them (Linux; empty elsewhere)."""
    for line in _cpuinfo_lines():
        if line.lower().startswith(("flags", "features")):
            return sorted(line.split(":", 1)[1].split())
    return []


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace").splitlines()[:64]
    except OSError:
        return []


def system_info() -> dict:
    """What `epicode-edge doctor` shows about llama.cpp on this machine (loads the library, may probe)."""
    import llama_cpp
    import llama_cpp.llama_cpp as lowlevel

    flags = cpu_flags()
    d = decide()
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "gpu_offload": bool(lowlevel.llama_supports_gpu_offload()),
        "build": lowlevel.llama_print_system_info().decode("utf-8", "replace").strip(),
        "cpu": cpu_name(),
        "cpu_features": [f for f in flags if f.startswith(("amx", "avx512", "avx2", "avx_vnni", "asimd", "sve"))],
        "mode": d.mode, "mode_source": d.source, "use_extra_bufts": d.use_extra_bufts,
        "kernels": d.kernels, "reason": d.reason,
        "probe": asdict(d.probe) if d.probe else None,
        "cache_file": str(cache_dir() / CACHE_FILE),
    }


if __name__ == "__main__":
    if sys.argv[1:] in (["probe"], ["smoke"]):
        sys.exit(_child(smoke=sys.argv[1] == "smoke"))
    print("usage: python -m epicode_edge.backends.cpu_kernels probe|smoke", file=sys.stderr)
    sys.exit(2)
