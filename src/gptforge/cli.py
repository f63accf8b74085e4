"""The `gptforge` command line: one function per verb, each a thin door onto the Python API.
Bad input ends with one line on stderr and exit code 2, a failure of the system under us (a full disk)
with one line and exit code 1; never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence

import torch

from .errors import USER_ERRNOS, GptforgeError, SystemFailure, os_error_message
from .options import SEED_MAX, add_flags, flag_type

# A small GPT-2-tokenizer model trained on Tiny Shakespeare, shipped in gptforge/assets (see README).
DEFAULT_MODEL = "gptforge-shakespeare"


class _Default(int):
    """An int flag's default, told apart from the same number given on the command line (`is`)."""


DEFAULT_SEED = _Default(123)


def _format_count(n: int) -> str:
    return f"{n:,}"


MODEL_HELP = ("preset (e.g. gpt2-124m, book-124m), checkpoint (gptforge or Hugging Face directory, GGUF file, book "
              "state dict .pth) or Hugging Face hub id (e.g. gpt2, openai-community/gpt2-medium)")
CONFIG_HELP = ("GPTConfig JSON (the book's config keys) for a book state dict whose width is not one of "
               "GPT-2's four (its number of heads is not in the tensors)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _model_name(args: argparse.Namespace) -> str:
    """info takes its model as a positional argument or --model (not both)."""
    if args.model_pos and args.model and args.model_pos != args.model:
        raise GptforgeError(f"two models given ({args.model_pos!r} and --model {args.model!r}); give one")
    name = args.model_pos or args.model
    if not name:
        raise GptforgeError("no model given: gptforge info MODEL (or --model MODEL)")
    return name


def _book_config_arg(args: argparse.Namespace):
    """The --config JSON (a GPTConfig) for a book state dict, or None."""
    from .config import GPTConfig

    return GPTConfig.from_json(args.config) if args.config else None


def cmd_info(args: argparse.Namespace) -> None:
    """Print the parameter counts by component and the weights' memory, without building the model
    (a checkpoint's config.json is read, not its weights)."""
    from .checkpoint import load_config
    from .model import count_parameters

    args.model = _model_name(args)
    cfg = load_config(args.model, config=_book_config_arg(args))
    counts = count_parameters(cfg)
    rows = [
        ("embeddings (token + position)", counts.embeddings),
        ("attention", counts.attention),
        ("feed-forward", counts.feed_forward),
        ("layer norms", counts.norms),
        ("output head" + (" (tied to token embedding)" if cfg.tie_weights else ""), counts.head),
        ("total", counts.total),
        ("total, output head counted once", counts.total_head_once),
    ]
    print(f"model: {args.model}")
    print(", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {_format_count(value):>15}")
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        print(f"{'weights in ' + name:<{width}}  {counts.weight_bytes(dtype) / 2**20:>12,.1f} MiB")


def _add_device_option(parser: argparse.ArgumentParser) -> None:
    """--device for the verbs that run a model (train and finetune take theirs from their configs)."""
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")


def _generation_options(args: argparse.Namespace) -> dict:
    """The GenerationConfig fields given on the command line (validated by GenerationConfig)."""
    from .generation import GenerationConfig

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationConfig)
               if getattr(args, f.name, None) is not None}
    if "stop_strings" in options:  # the shell passes "\n" as two characters
        options["stop_strings"] = tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in options["stop_strings"])
    return options


def cmd_generate(args: argparse.Namespace) -> None:
    """Continue the prompt: streamed to the terminal as it is produced, unless --no-stream or
    several sequences are asked for."""
    from .checkpoint import load, untrained_preset_note
    from .generation import GenerationConfig, generate_text, stream_text
    from .fast import prepare_for_inference

    config = GenerationConfig(**_generation_options(args))  # bad values fail before the model loads
    note = untrained_preset_note(args.model)
    if args.model.lower() == "book-124m" and args.seed is not DEFAULT_SEED:
        note = None  # the seed's own gibberish, asked for, needs no note
    torch.manual_seed(args.seed)  # a preset's random weights
    model = load(args.model, device=args.device, config=_book_config_arg(args))
    prepare_for_inference(model, args.dtype, args.quantize)
    if args.no_stream or config.num_return_sequences > 1:
        texts = generate_text(model, args.prompt, config=config)
        texts = [texts] if isinstance(texts, str) else texts
        _print_note(note)  # once the text is there: an error before it stays one line
        print("\n\n".join(texts) if len(texts) == 1 else "\n".join(
            f"--- sequence {i + 1} ---\n{t}" for i, t in enumerate(texts)))
        return
    chunks = stream_text(model, args.prompt, config=config)
    first = next(chunks, "")  # bad values for this model (a KV cache too big) fail here
    _print_note(note)
    sys.stdout.write(args.prompt)
    for chunk in itertools.chain([first], chunks):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _print_note(note: str | None) -> None:
    if note:
        print(f"gptforge: note: {note}", file=sys.stderr)


def cmd_convert(args: argparse.Namespace) -> None:
    """Read a checkpoint in any format and write it as a gptforge or Hugging Face directory, or as
    one GGUF file (llama.cpp's format, weights in --gguf-type)."""
    from .checkpoint import load, save

    from .lora import has_lora, merge_lora

    if args.gguf_type is not None and args.to != "gguf":
        raise GptforgeError("--gguf-type is for --to gguf; the other formats keep the weights' dtype (see --dtype)")
    model = load(args.src, dtype=DTYPES[args.dtype] if args.dtype else None, config=_book_config_arg(args))
    if args.merge_lora:
        if not has_lora(model):
            raise GptforgeError(f"{args.src} has no LoRA adapters to merge; drop --merge-lora")
        merge_lora(model)
    options = {"gguf_type": args.gguf_type or "f32"} if args.to == "gguf" else {}
    out = save(model, args.out, format=args.to, **options)
    kind = options["gguf_type"].upper() if options else str(model.tok_emb.weight.dtype).removeprefix("torch.")
    print(f"wrote {args.to} checkpoint {out} ({model.num_parameters():,} parameters, {kind})")


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve the model over HTTP with OpenAI's completions API until SIGINT/SIGTERM."""
    from .checkpoint import load
    from .fast import prepare_for_inference
    from .serve import ServeSettings, run_server

    torch.manual_seed(args.seed)
    model = load(args.model, device=args.device, config=_book_config_arg(args))
    prepare_for_inference(model, args.dtype, args.quantize)  # the same kernels as generate
    if args.max_tokens_cap is not None and args.max_tokens_cap > model.cfg.context_length:
        raise GptforgeError(f"--max-tokens-cap {args.max_tokens_cap} exceeds the model's context length "
                         f"{model.cfg.context_length}")
    settings = ServeSettings(
        model_name=args.served_model_name or args.model, max_tokens_cap=args.max_tokens_cap,
        max_body_bytes=args.max_body_bytes, max_batch_size=args.max_batch_size,
        shutdown_grace_s=args.shutdown_grace, api_key=args.api_key or os.environ.get("GPTFORGE_API_KEY") or None,
        cors_origins=tuple(args.cors_origin or ()),
    )
    run_server(model, settings, host=args.host, port=args.port)


def cmd_eval(args: argparse.Namespace) -> None:
    """A language model: perplexity (loss, bits per byte) of each text file by sliding window, and of
    all together. A classifier: accuracy, per-class precision/recall/F1 and the confusion matrix."""
    from .checkpoint import load, load_config
    from .data import read_text
    from .evaluate import Perplexity, check_stride, perplexity
    from .fast import prepare_for_inference

    if load_config(args.model, config=_book_config_arg(args)).classifier is not None:
        return _eval_classifier(args)
    if args.text_column is not None or args.label_column is not None:  # else ignored without a word
        raise GptforgeError("--text-column and --label-column are for a classifier's labelled data; this model is "
                            "a language model, scored on plain text files")
    texts = {path: read_text(path) for path in args.data}  # bad files fail before the model loads
    torch.manual_seed(args.seed)  # a preset's random weights
    model = load(args.model, device=args.device, config=_book_config_arg(args))
    stride = model.cfg.context_length if args.stride is None else args.stride
    check_stride(stride, model.cfg.context_length)
    prepare_for_inference(model, args.dtype, args.quantize)
    scores = {}
    for path, text in texts.items():
        try:
            scores[path] = perplexity(model, text, stride=stride, batch_size=args.batch_size, progress=True)
        except GptforgeError as err:
            raise GptforgeError(f"{path}: {err}") from None  # which of several files it was
    total = Perplexity.combine(list(scores.values()))
    if args.json:
        files = [{"file": path, **score.to_dict()} for path, score in scores.items()]
        print(json.dumps({"model": args.model, "stride": stride, "dtype": args.dtype, "quantize": args.quantize,
                          **total.to_dict(), "files": files}))
        return
    print(f"model: {args.model}  context: {model.cfg.context_length}  stride: {stride}  "
          f"dtype: {args.dtype}  quantize: {args.quantize}")
    rows = [(path, s) for path, s in scores.items()] + ([("total", total)] if len(scores) > 1 else [])
    width = max(len("file"), *(len(name) for name, _ in rows))
    print(f"{'file':<{width}}  {'tokens':>10}  {'bytes':>11}  {'loss':>7}  {'perplexity':>11}  {'bits/byte':>9}")
    for name, s in rows:
        print(f"{name:<{width}}  {s.tokens:>10,}  {s.bytes:>11,}  {s.loss:>7.4f}  {s.perplexity:>11.3f}  "
              f"{s.bits_per_byte:>9.4f}")


def _eval_classifier(args: argparse.Namespace) -> None:
    """`gptforge eval` on a classifier: its report on labelled CSV/TSV/JSONL/JSON file(s)."""
    from .checkpoint import load
    from .evaluate import evaluate_classifier
    from .fast import prepare_for_inference

    if args.stride is not None:
        raise GptforgeError("--stride is for language models; this model is a classifier")
    model = load(args.model, device=args.device, config=_book_config_arg(args))
    prepare_for_inference(model, args.dtype, args.quantize)
    report = evaluate_classifier(model, args.data, text_column=args.text_column or "text",
                                 label_column=args.label_column or "label",
                                 batch_size=args.batch_size, progress=True)  # a bar on a terminal, as for text
    if args.json:
        print(json.dumps({"model": args.model, "dtype": args.dtype, "quantize": args.quantize, **report.to_dict()}))
        return
    print(f"model: {args.model} (classifier)  dtype: {args.dtype}  quantize: {args.quantize}")
    print(report.format())


def _add_precision_flags(parser: argparse.ArgumentParser, default: str = "float32") -> None:
    """--dtype and --quantize for a verb that runs the model through fast.prepare_for_inference."""
    from .fast import DTYPES as COMPUTE_DTYPES, QUANTIZATIONS

    parser.add_argument("--dtype", choices=("auto", *COMPUTE_DTYPES), default=default,
                        help="compute dtype; bfloat16: bf16 weights (on CPU through gptforge's kernels, float32 "
                             f"activations); auto: this CPU's choice (fast.choose_mode) (default: {default})")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                        help="int8: weight-only int8 linears; int4: 4-bit groups as llama.cpp's Q4_0 "
                             "(on CPU through gptforge's kernels, activations quantized as Q8_0)")


def _add_eval_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ev = verbs.add_parser(
        "eval", help="perplexity of text files, or a classifier's accuracy",
        description="A language model: loss, perplexity and bits per byte of text files, by the sliding "
                    "window of Hugging Face's perplexity guide. A classifier (from `finetune classify`): "
                    "accuracy, per-class precision/recall/F1 and the confusion matrix on labelled "
                    "CSV/TSV/JSONL/JSON files. See docs/evaluation.md.")
    ev.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})")
    ev.add_argument("--data", nargs="+", required=True, metavar="FILE",
                    help="UTF-8 text file(s), each scored on its own; for a classifier, labelled records")
    # its upper bound is the model's context length, checked once the model is known
    ev.add_argument("--stride", type=flag_type("int", "--stride", {"minimum": 1}), default=None,
                    help="tokens between window starts, in [1, context length] (default: the context "
                         "length, disjoint windows); smaller gives each token more context")
    ev.add_argument("--batch-size", type=flag_type("int", "--batch-size", {"minimum": 1}), default=4,
                    help="windows (or a classifier's texts) per forward pass (default: 4)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ev.add_argument("--text-column", default=None,
                    help="a classifier's data: the column holding the texts (default: text)")
    ev.add_argument("--label-column", default=None,
                    help="a classifier's data: the column holding the labels (default: label)")
    _add_precision_flags(ev)
    _add_device_option(ev)
    ev.add_argument("--seed", type=flag_type("int", "--seed", {"minimum": 0, "maximum": SEED_MAX}), default=123,
                    help="torch seed for a preset's random weights (default: 123)")
    ev.set_defaults(func=cmd_eval)
    return ev


def _train_options(args: argparse.Namespace) -> dict:
    """TrainConfig options from a config file and the flags given (flags win)."""
    from .train import TrainConfig, read_config_file

    options = read_config_file(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            options[f.name] = value
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise GptforgeError(f"--set expects KEY=VALUE (a GPTConfig field), got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        options.setdefault("model_overrides", {})
        options["model_overrides"] = {**options["model_overrides"], key.strip(): value}
    return options


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or finetune, or resume) a model; exit code 130 when stopped by Ctrl-C after saving."""
    from .train import train

    result = train(**_train_options(args))
    val = f", val loss {result.val_loss:.4f} (perplexity {result.val_perplexity:,.2f})" if result.val_loss is not None else ""
    train_loss = f", train loss {result.train_loss:.4f}" if result.train_loss is not None else ""
    print(f"{'stopped' if result.interrupted else 'done'} after {result.steps} steps, "
          f"{result.tokens_seen:,} tokens{train_loss}{val}; checkpoint: {result.checkpoint}")
    state = result.checkpoint / "training_state.pt"
    if not result.interrupted and state.is_file():  # as large as the model twice over: say why it is there
        print(f"{state} ({state.stat().st_size / 2**20:,.0f} MiB: optimizer and data position) lets "
              f"`gptforge train --out {result.out} --resume --max-steps N` train further; delete it to keep the "
              "model alone")
    return 130 if result.interrupted else 0


def _add_train_parser(verbs: argparse._SubParsersAction) -> None:
    from .train import TrainConfig

    tr = verbs.add_parser(
        "train", help="train, finetune or resume a model on text",
        description="Train on a text file, folder or glob. Flags are TrainConfig fields; a --config "
                    "JSON/TOML file holds the same keys (flags win). Launch with torchrun for several processes.",
    )
    tr.add_argument("--config", metavar="FILE", help="JSON or TOML file of training options")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="change a model config field, e.g. --set context_length=256 (repeatable)")
    add_flags(tr, TrainConfig, skip=("model_overrides",), int_minimum=0)
    tr.set_defaults(func=cmd_train)


def _config_options(args: argparse.Namespace, cls: type) -> dict:
    """The fields of dataclass `cls` whose flags were given (the others keep the class defaults)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def cmd_classify(args: argparse.Namespace) -> None:
    """Print the predicted label of each text (one line each), or JSON lines with probabilities."""
    from .classifier import classify

    for text, prediction in zip(args.texts, classify(args.model, args.texts, device=args.device)):
        if args.json:
            print(json.dumps({"text": text, "label": prediction.label, "probabilities": prediction.probabilities}))
        else:
            print(prediction.label)


def cmd_finetune_classify(args: argparse.Namespace) -> int:
    """Finetune a model into a text classifier; prints the final accuracies and the checkpoint."""
    from .finetune import ClassifyConfig, finetune_classify

    result = finetune_classify(**_config_options(args, ClassifyConfig))
    accuracies = ", ".join(f"{name} accuracy {value * 100:.2f}%" for name, value in
                           (("train", result.train_accuracy), ("val", result.val_accuracy),
                            ("test", result.test_accuracy)) if value is not None)
    print(f"{'stopped' if result.interrupted else 'done'} after {result.steps} steps; {accuracies}; "
          f"labels {', '.join(result.labels)}; checkpoint: {result.checkpoint}")
    return 130 if result.interrupted else 0


def cmd_finetune_instruct(args: argparse.Namespace) -> int:
    """Teach a model to follow instructions; prints the last losses, the checkpoint and the responses."""
    from .finetune import InstructConfig, finetune_instruct

    result = finetune_instruct(**_config_options(args, InstructConfig))
    losses = ", ".join(f"{name} loss {value:.3f}" for name, value in
                       (("train", result.train_loss), ("val", result.val_loss)) if value is not None)
    responses = f"; test responses: {result.responses}" if result.responses else ""
    print(f"{'stopped' if result.interrupted else 'done'} after {result.steps} steps"
          f"{'; ' + losses if losses else ''}; checkpoint: {result.checkpoint}{responses}")
    return 130 if result.interrupted else 0


def cmd_finetune_dpo(args: argparse.Namespace) -> int:
    """Tune a model on preference pairs (DPO); prints the final validation metrics and the checkpoint."""
    from .dpo import DPOConfig, finetune_dpo

    result = finetune_dpo(**_config_options(args, DPOConfig))
    final = result.final
    val = (f"; val loss {final['val_loss']:.3f}, reward accuracy {final['val_reward_accuracy'] * 100:.1f}%, "
           f"reward margin {final['val_reward_margin']:.3f}") if final else ""
    print(f"{'stopped' if result.interrupted else 'done'} after {result.steps} steps{val}; "
          f"checkpoint: {result.checkpoint}")
    return 130 if result.interrupted else 0


def _add_finetune_parser(verbs: argparse._SubParsersAction) -> None:
    from .dpo import DPOConfig
    from .finetune import ClassifyConfig, InstructConfig

    ft = verbs.add_parser("finetune", help="adapt a model to a task (classify, instruct, dpo)")
    tasks = ft.add_subparsers(dest="task", required=True, metavar="TASK")
    tasks_table = (
        ("classify", ClassifyConfig, cmd_finetune_classify, "text classification (the book's chapter 6)",
         "Finetune a model to classify texts from CSV/JSONL records with a text and a label column. "
         "Defaults are the book's recipe, except --pool last-real (see docs/finetuning.md)."),
        ("instruct", InstructConfig, cmd_finetune_instruct, "instruction following (the book's chapter 7)",
         "Finetune a model to follow instructions from Alpaca-style JSON/JSONL records (instruction, "
         "input, output). Defaults are the book's recipe (see docs/instruct.md)."),
        ("dpo", DPOConfig, cmd_finetune_dpo, "preference tuning by DPO (the book's ch. 7 bonus)",
         "Tune a model on preference pairs: JSON/JSONL/CSV records with instruction, input, chosen and "
         "rejected, by direct preference optimization (Rafailov et al. 2023). Defaults are the book's "
         "recipe (see docs/dpo.md)."),
    )
    for task, config, func, help, description in tasks_table:
        sub = tasks.add_parser(task, help=help, description=description)
        add_flags(sub, config)
        sub.set_defaults(func=func)


def cmd_judge(args: argparse.Namespace) -> None:
    """Score responses 0-100 with a judge model behind an OpenAI-compatible endpoint (the book's ch. 7)."""
    from .instruct import read_records
    from .judge import default_scores_path, judge

    records = read_records(args.data)
    out = args.out or default_scores_path(args.data)
    result = judge(records, url=args.url, model=args.model, out=out, key=args.key, timeout=args.timeout,
                   max_tokens=args.max_tokens, skip_invalid=args.skip_invalid, source=args.data,
                   progress=sys.stderr.isatty())  # a bar on a terminal, as eval's
    scored = [s for s in result.scores if s is not None]
    mean = f"{result.mean:.2f}" if result.mean is not None else "n/a"
    skipped = len(result.scores) - len(scored)
    print(f"mean score {mean} over {len(scored)} responses"
          + (f" ({skipped} replies were not numbers)" if skipped else "") + f"; scores: {out}")


def _add_judge_parser(verbs: argparse._SubParsersAction) -> None:
    jd = verbs.add_parser(
        "judge", help="score responses 0-100 with a judge model (any OpenAI-compatible chat endpoint)",
        description="The book's chapter-7 evaluation: each record's response is scored by a judge model "
                    "asked with the book's prompt (temperature 0, seed 123).")
    jd.add_argument("--data", required=True, metavar="FILE",
                    help="JSON/JSONL records with instruction, input, output and the response (--key)")
    jd.add_argument("--url", required=True, help="the endpoint's base URL, e.g. http://127.0.0.1:11434/v1")
    jd.add_argument("--model", required=True, help="the judge model's name at the endpoint")
    jd.add_argument("--key", default="model_response", help="the field holding the response (default: model_response)")
    jd.add_argument("--out", default=None, metavar="FILE",
                    help="scores as JSONL, written as they arrive to OUT.partial, which replaces OUT when the run "
                         "ends (default: DATA-scores.jsonl beside the data)")
    jd.add_argument("--timeout", type=flag_type("float", "--timeout", {"minimum": 0}), default=60.0,
                    help="seconds per request (default: 60)")
    jd.add_argument("--max-tokens", type=flag_type("int", "--max-tokens", {"minimum": 1}), default=None,
                    help="cap the judge's reply (default: none sent)")
    jd.add_argument("--skip-invalid", action="store_true",
                    help="a reply that is not an integer 0-100 is recorded as null and skipped, as the book "
                         "does (default: stop there)")
    jd.set_defaults(func=cmd_judge)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (like every other bad input), not the usage block, a
    mistyped verb names the closest one, and a flag is spelled whole (no prefix of one flag that a
    later flag could turn into another's)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # sub-parsers are built by this class too
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        import re

        from .errors import did_you_mean

        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        hint = did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2))) if choice else ""
        self.exit(2, f"{self.prog}: error: {message}{hint} (see {self.prog} --help)\n")


def _add_info_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    info = verbs.add_parser("info", help="parameter counts and memory of a model")
    info.add_argument("model_pos", nargs="?", metavar="MODEL", help=MODEL_HELP)
    info.add_argument("--model", default=None, help="the same as MODEL")
    info.set_defaults(func=cmd_info)
    return info


def _add_generate_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The decoding flags are GenerationConfig's fields (help, type and range from its metadata)."""
    from .generation import GenerationConfig

    gen = verbs.add_parser("generate", help="continue a prompt (streams by default)")
    gen.add_argument("prompt", metavar="PROMPT", help="text to continue; empty starts from <|endoftext|>")
    gen.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})")
    # the CLI seeds by default, so a preset's random weights and sampling repeat run to run
    add_flags(gen, GenerationConfig, defaults={"seed": DEFAULT_SEED})
    _add_precision_flags(gen, default="auto")
    gen.add_argument("--no-stream", action="store_true", help="print the whole text at the end instead of streaming")
    _add_device_option(gen)
    gen.set_defaults(func=cmd_generate)
    return gen


def _add_serve_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    srv = verbs.add_parser("serve", help="OpenAI-compatible completions server (loopback by default)")
    srv.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    srv.add_argument("--port", type=flag_type("int", "--port", {"minimum": 0, "maximum": 65535}), default=8000,
                     help="port (default: 8000)")
    srv.add_argument("--served-model-name", default=None, help="model id clients use (default: --model)")
    _add_device_option(srv)
    _add_precision_flags(srv, default="auto")
    srv.add_argument("--seed", type=flag_type("int", "--seed", {"minimum": 0, "maximum": SEED_MAX}), default=123,
                     help="torch seed for a preset's random weights (default: 123)")
    positive = {"minimum": 1}
    srv.add_argument("--max-batch-size", type=flag_type("int", "--max-batch-size", positive), default=16,
                     help="sequences decoded together (default: 16)")
    srv.add_argument("--max-tokens-cap", type=flag_type("int", "--max-tokens-cap", positive), default=None,
                     help="largest max_tokens a request may ask (default: the context length)")
    srv.add_argument("--max-body-bytes", type=flag_type("int", "--max-body-bytes", positive), default=1 << 20,
                     help="larger request bodies get 413 (default: 1 MiB)")
    srv.add_argument("--shutdown-grace", type=flag_type("float", "--shutdown-grace", {"minimum": 0}), default=10.0,
                     help="seconds in-flight requests may still run after SIGTERM (default: 10)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every route but /health and the web page "
                          "(default: $GPTFORGE_API_KEY, else none)")
    srv.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                     help="let pages from ORIGIN (e.g. http://localhost:3000, or '*') call the server; repeatable "
                          "(default: none)")
    srv.set_defaults(func=cmd_serve)
    return srv


def _add_convert_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .checkpoint.gguf import GGUF_TYPES

    conv = verbs.add_parser("convert", help="convert a checkpoint to the gptforge, Hugging Face or GGUF format")
    conv.add_argument("src", metavar="SRC", help="checkpoint directory, GGUF file, book state dict file or hub id")
    conv.add_argument("--to", required=True, choices=("gptforge", "hf", "gguf"), help="output format")
    conv.add_argument("--out", required=True, metavar="PATH", help="output directory, or file for gguf (an existing checkpoint there is replaced atomically; other contents are refused)")
    conv.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                      help="GGUF weight type: f32 (default), f16, bf16, q8_0 or q4_0 (llama.cpp's 8- and 4-bit blocks)")
    conv.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="convert the weights (default: keep)")
    conv.add_argument("--merge-lora", action="store_true",
                      help="add a LoRA checkpoint's adapters into its base's weights: a plain checkpoint")
    conv.set_defaults(func=cmd_convert)
    return conv


def build_parser() -> argparse.ArgumentParser:
    """The `gptforge` parser: one sub-parser per verb."""
    from . import __version__

    parser = _Parser(prog="gptforge", description="GPT-2 from scratch: inspect, generate, train, serve, evaluate.")
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    for add in (_add_info_parser, _add_generate_parser, _add_serve_parser, _add_convert_parser, _add_eval_parser):
        add(verbs).add_argument("--config", metavar="JSON", default=None, help=CONFIG_HELP)
    _add_train_parser(verbs)
    _add_finetune_parser(verbs)
    cls = verbs.add_parser("classify", help="predict labels with a classifier (from `finetune classify`)")
    cls.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify")
    cls.add_argument("--model", required=True, help="classifier checkpoint directory (OUT/checkpoint)")
    cls.add_argument("--json", action="store_true", help="one JSON object per text, with every label's probability")
    _add_device_option(cls)
    cls.set_defaults(func=cmd_classify)
    _add_judge_parser(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; returns the exit code (2 for bad input, given as a flag or found by the verb)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse has printed its one line (or the help)
        return stop.code or 0
    previous = _end_on_sigterm()
    try:
        code = args.func(args)
    except (GptforgeError, FileNotFoundError, PermissionError) as err:  # PermissionError: a path the user's
        print(f"gptforge: error: {err}", file=sys.stderr)
        return 2
    except SystemFailure as err:  # the system's failure (a full disk), not the user's input
        print(f"gptforge: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # its message, if any, says what was kept (judge's scores so far)
        print(f"gptforge: interrupted{'; ' + str(stop) if str(stop) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # whoever read our output stopped (`gptforge generate ... | head -3`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # as a program stopped by SIGPIPE
    except OSError as err:  # a path the system refused: the user's (not a folder...) or the system's (disk full)
        print(f"gptforge: error: {os_error_message(err)}", file=sys.stderr)
        return 2 if err.errno in USER_ERRNOS else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code or 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _end_on_sigterm() -> object:
    """SIGTERM ends a verb as Ctrl-C does (atomic writes remove their temporary files, one line, exit 130)
    instead of killing it where it stands; train's StopRequest and serve take it over while they run.
    Returns the handler to restore (None off the main thread, where none can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


if __name__ == "__main__":
    sys.exit(main())
