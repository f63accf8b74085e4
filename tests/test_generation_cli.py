"""`gptforge generate`: streaming by default, every decoding option as a flag, errors as one line."""

from __future__ import annotations

import pytest
import torch

from gptforge.cli import build_parser, main


def test_cli_streams_the_seed_sentence(capsys):
    assert main(["generate", "Hello, I am", "--model", "book-124m", "--seed", "123", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == "Hello, I am Featureiman Byeswickattribute argue\n"


def test_cli_flags_reach_the_generation_config():
    from gptforge.cli import _generation_options
    from gptforge.generation import GenerationConfig

    args = build_parser().parse_args([
        "generate", "x", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--min-p", "0.05",
        "--repetition-penalty", "1.2", "--presence-penalty", "0.5", "--frequency-penalty", "0.25",
        "--stop", "\\nUser:", "--stop", "END", "--stop-token-ids", "13,50256", "--num-return-sequences", "2",
        "--seed", "9", "--max-new-tokens", "7", "--dtype", "bfloat16", "--quantize", "int8", "--no-stream",
    ])
    cfg = GenerationConfig(**_generation_options(args))
    assert cfg == GenerationConfig(
        max_new_tokens=7, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
        presence_penalty=0.5, frequency_penalty=0.25, stop_strings=("\nUser:", "END"),
        stop_token_ids=(13, 50256), num_return_sequences=2, seed=9,
    )
    assert args.dtype == "bfloat16" and args.quantize == "int8" and args.no_stream
    none = build_parser().parse_args(["generate", "x", "--stop-token-ids", "none"])
    assert GenerationConfig(**_generation_options(none)).stop_token_ids == ()


@pytest.mark.parametrize("argv, message", [
    (["--top-p", "3"], "--top-p"), (["--num-return-sequences", "2"], "num_return_sequences"),
    (["--stop-token-ids", "a,b"], "--stop-token-ids"), (["--model", "nope"], "nope"),
    (["--stop-token-ids", str(10**23)], "stop_token_ids must be an integer >= 0 and <="),
    # a KV cache that could never fit: refused before it is allocated (the process was killed silently)
    (["--temperature", "1", "--num-return-sequences", str(10**7)], "a KV cache of 10000000 rows x 51 positions needs"),
    (["--device", "gpu0"], "unknown device"), (["--device", "meta"], "unknown device 'meta'"),
    pytest.param(["--device", "cuda"], "CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_cli_bad_values_are_one_line_exit_2(capsys, argv, message):
    assert main(["generate", "x", "--model", "book-124m", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_generate_flags_come_from_the_generation_config_fields():
    """One source of truth: each GenerationConfig field (but pad_token_id) is a flag whose help is
    the field's metadata, and whose default is the field's (seed: the CLI's 123)."""
    import dataclasses

    from gptforge.generation import GenerationConfig

    parser = build_parser()
    gen = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("generate"))
    actions = {a.dest: a for a in gen._actions}
    for f in dataclasses.fields(GenerationConfig):
        if f.name == "pad_token_id":
            assert f.name not in actions
            continue
        assert actions[f.name].help.startswith(f.metadata["help"]), f.name
    args = parser.parse_args(["generate", "x"])
    from gptforge.cli import _generation_options
    assert GenerationConfig(**_generation_options(args)) == GenerationConfig(seed=123)


def test_a_reader_that_stops_early_gets_no_traceback():
    """`gptforge generate ... | head -c 5`: once the reader has gone, the next write fails with
    EPIPE; the command ends quietly (exit 141, as a program stopped by SIGPIPE), no traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "gptforge", "generate", "ROMEO:", "--max-new-tokens", "200",
                             "--temperature", "0.8", "--seed", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(5) == b"ROMEO"
    proc.stdout.close()  # the reader goes away while tokens are still coming
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "Error" not in err, err


def test_cli_extreme_sampling_values_generate_their_greedy_limit(tmp_path, tiny_config, capsys):
    """A temperature or top_p near 0 that float32 cannot divide or compare: the greedy text, no traceback."""
    from gptforge import GPTModel, save

    torch.manual_seed(0)
    path = save(GPTModel(tiny_config(vocab_size=50257, context_length=32)), tmp_path / "m")
    run = ["generate", "Hello, I am", "--model", str(path), "--max-new-tokens", "8", "--stop-token-ids", "none"]
    assert main(run) == 0
    greedy = capsys.readouterr().out
    for extreme in (["--temperature", "1e-38"], ["--temperature", "5e-324"], ["--temperature", "1", "--top-p", "1e-300"]):
        assert main(run + extreme) == 0, extreme
        assert capsys.readouterr().out == greedy, extreme


def test_cli_a_model_that_overflows_is_one_line_exit_2(tmp_path, tiny_config, capsys):
    from gen_helpers import overflowing_model
    from gptforge import GPTModel, save
    from gptforge.tokenizer import get_tokenizer

    torch.manual_seed(0)
    token = get_tokenizer().encode(" zebra")[-1]
    path = save(overflowing_model(GPTModel(tiny_config(vocab_size=50257, context_length=32, emb_dim=64)), token),
                tmp_path / "m")
    assert main(["generate", "Hello zebra", "--model", str(path), "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not finite" in err and "Traceback" not in err, err
