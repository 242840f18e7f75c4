"""One table of bad inputs across every command: each must end with exit code 2 and exactly one line on stderr
(``error: ...``) naming the argument, create no output path (nor a temp dir beside it), and change no input.

The commands run in-process through ``macq.cli.main`` (the console entry point) on tiny models, so the
whole table runs in seconds; ``test_subprocess_unknown_option`` checks the real process once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from macq.tiny import save_tiny_model

OUT = "{out}"  # a fresh path per case; must not exist afterwards


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Every input the table refers to, by placeholder name."""
    import macq.cli  # noqa: F401  (import once, outside the timed cases)
    from macq.pipeline import load_quantized_or_model, quantize

    root = tmp_path_factory.mktemp("inputs")
    d: dict[str, Path] = {"root": root}
    d["tiny"] = save_tiny_model(root / "tiny", "llama")
    d["gpt2"] = save_tiny_model(root / "gpt2", "gpt2")
    _, fp, tok = load_quantized_or_model(str(d["tiny"]))
    qm = quantize(fp, tok, "rtn", {"bits": 4, "group_size": 32}, source=str(d["tiny"]))
    d["q"] = qm.save(root / "q", tokenizer=tok)

    def variant(name: str, src: Path) -> Path:
        dst = root / name
        subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
        return dst

    d["corrupt"] = variant("corrupt", d["tiny"])
    with open(d["corrupt"] / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    d["missing"] = variant("missing", d["tiny"])
    sd = load_file(d["missing"] / "model.safetensors")
    sd.pop("model.layers.1.mlp.down_proj.weight")
    save_file(sd, d["missing"] / "model.safetensors", metadata={"format": "pt"})
    d["nan"] = variant("nan", d["tiny"])
    sd = load_file(d["nan"] / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"][3, 5] = float("nan")
    save_file(sd, d["nan"] / "model.safetensors", metadata={"format": "pt"})
    d["qcorrupt"] = variant("qcorrupt", d["q"])
    with open(d["qcorrupt"] / "records.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    d["qnan"] = variant("qnan", d["q"])
    rec = load_file(d["qnan"] / "records.safetensors")
    rec["model.layers.0.mlp.up_proj.scales"][0, 0] = float("inf")
    save_file(rec, d["qnan"] / "records.safetensors")
    (d["qnan"] / "records.safetensors.index.json").unlink()  # as an older writer left it: no checksums, so the NaN is what is found
    d["qmanifest"] = variant("qmanifest", d["q"])
    (d["qmanifest"] / "manifest.json").write_text('{"format": "macq", "vers')
    d["binary"] = root / "binary.txt"
    d["binary"].write_bytes(bytes(range(256)) * 8)
    d["empty"] = root / "empty.txt"
    d["empty"].write_text("\n \n")
    d["victim"] = root / "victim"
    d["victim"].mkdir()
    (d["victim"] / "thesis.tex").write_text("years of work")
    d["file"] = root / "notes.txt"
    d["file"].write_text("not a directory")
    d["fake_pkg"] = root / "fake.mlpackage"
    d["fake_pkg"].mkdir()
    (d["fake_pkg"] / "Manifest.json").write_text("{ not json")
    return d


# (command line with {placeholders}, text the one stderr line must contain)
CASES = [
    # quantize: option values
    ("quantize {tiny} -o {out} --bits 9", "--bits 9"),
    ("quantize {tiny} -o {out} --group-size 48", "--group-size 48"),
    ("quantize {tiny} -o {out} --group-size -7", "--group-size -7"),
    ("quantize {tiny} -o {out} --method nosuch", "--method 'nosuch'"),
    ("quantize {tiny} -o {out} --bits four", "--bits"),
    ("quantize {tiny} -o {out} --nosuch-flag 1", "--nosuch-flag"),
    ("quantize {tiny} -o {out} --steps 5", "--steps"),                         # a dkm option given to rtn
    ("quantize {tiny} -o {out} --n-calib 8", "--n-calib"),                     # rtn uses no calibration
    ("quantize {tiny} -o {out} --target onnx", "--target 'onnx'"),
    ("quantize {tiny} -o {out} --override down_proj=nosuch:1", "--override"),
    ("quantize {tiny} -o {out} --override down_proj=bits:9", "--override"),
    ("quantize {tiny} -o {out} --method gptq --override x=bits:3", "--override"),
    ("quantize {tiny} -o {out} --method mixed --base-method nope", "--base-method"),
    ("quantize {tiny} -o {out} --method gptq --calib-dataset {binary}", "dataset"),
    ("quantize {tiny} -o {out} --method gptq --calib-dataset {empty}", "dataset"),
    ("quantize {tiny} -o {out} --method gptq --n-calib 0", "--n-calib 0"),
    # quantize: models and outputs
    ("quantize {root}/nope -o {out}", "model"),
    ("quantize {corrupt} -o {out}", "model"),
    ("quantize {missing} -o {out}", "down_proj"),
    ("quantize {nan} -o {out}", "NaN"),
    ("quantize {q} -o {out}", "model"),
    ("quantize {tiny} -o {victim} --force", "--output"),
    ("quantize {tiny} -o {q}", "--force"),
    ("quantize {tiny} -o {file}", "--output"),
    ("quantize {tiny} -o {file}/sub", "--output"),
    # export --target mlx
    ("export {tiny} --target mlx -o {out} --method gptq --bits 7", "--bits 7"),
    ("export {tiny} --target mlx -o {out} --group-size 0", "--group-size"),
    ("export {tiny} --target mlx -o {out} --method kmeans", "--method kmeans"),
    ("export {tiny} --target mlx -o {out} --dtype float8", "float8"),
    ("export {tiny} --target mlx -o {out} --context 64", "--context"),
    ("export {q} --target mlx -o {out} --method gptq --bits 3", "--method"),
    ("export {q} --target mlx -o {out} --bits 3", "--bits"),
    ("export {qcorrupt} --target mlx -o {out}", "records.safetensors"),
    ("export {qnan} --target mlx -o {out}", "NaN"),
    ("export {tiny} --target mlx -o {victim} --force", "--output"),
    ("export {tiny} --target onnx -o {out}", "--target 'onnx'"),
    # export --target coreml
    ("export {tiny} --target coreml -o {out}", "--output"),
    ("export {gpt2} --target coreml -o {out}.mlpackage", "model_type 'gpt2'"),
    ("export {tiny} --target coreml -o {out}.mlpackage --method smoothquant", "--method smoothquant"),
    ("export {tiny} --target coreml -o {out}.mlpackage --context 100000", "--context 100000"),
    ("export {tiny} --target coreml -o {out}.mlpackage --dtype float32", "--dtype"),
    ("export {tiny} --target coreml -o {out}.mlpackage --method kmeans --bits 5", "--bits 5"),
    ("export {tiny} --target coreml -o {out}.mlpackage --asymmetric --zero-point float", "--zero-point"),
    # eval / info / inspect / generate
    ("eval {root}/nope", "model"),
    ("eval {tiny} --dataset {binary}", "dataset"),
    ("eval {tiny} --dataset {empty}", "dataset"),
    ("eval {tiny} --context 1", "--context 1"),
    ("eval {tiny} --max-tokens 0", "--max-tokens 0"),
    ("eval {tiny} --device tpu", "device"),
    ("info {tiny}", "manifest.json"),
    ("info {qcorrupt}", "records.safetensors"),
    ("info {qmanifest}", "manifest.json"),
    ("info {qnan}", "NaN"),
    ("inspect {root}/nope.mlpackage", "nope.mlpackage"),
    ("inspect {fake_pkg}", "fake.mlpackage"),
    ("generate {root}/nope", "model"),
    ("generate {tiny} --max-tokens 0", "--max-tokens 0"),
    ("generate {qcorrupt}", "records.safetensors"),
]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    from macq.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table_is_large_enough():
    assert len(CASES) >= 25
    assert {c.split()[0] for c, _ in CASES} == {"quantize", "export", "eval", "info", "inspect", "generate"}


@pytest.mark.parametrize("cmd,expect", CASES, ids=[c for c, _ in CASES])
def test_bad_input(inputs, tmp_path, capsys, cmd, expect):
    out = tmp_path / "out"
    argv = [a.format(out=out, **{k: str(v) for k, v in inputs.items()}) for a in cmd.split()]
    before = _hashes(inputs["root"])
    code, stdout, err = run_main(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert expect in lines[0], lines[0]
    assert not out.exists() and not Path(f"{out}.mlpackage").exists()
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())          # no output, no temp dir
    assert not [p for p in inputs["root"].iterdir() if p.name.startswith(".")]  # no temp dir beside inputs
    assert _hashes(inputs["root"]) == before


def test_subprocess_unknown_option(tmp_path):
    """The real process: typer's vendored click error is one line, exit 2, no traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "macq.cli", "quantize", "-o", str(tmp_path / "q"), "--no-such", "5"],
                       capture_output=True, text=True, env=env)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: No such option: --no-such"), p.stderr


def test_error_messages_name_real_flags():
    """Every ``--flag`` a method config's error message names is an option of both quantize and export."""
    import re

    from typer.main import get_command

    from macq.cli import app

    cmd = get_command(app)
    have = {c: {o for p in cmd.commands[c].params for o in (*p.opts, *p.secondary_opts)} for c in ("quantize", "export")}
    src = "".join(p.read_text() for p in Path(__file__).parents[1].joinpath("macq", "quantizers").glob("*.py"))
    named = set(re.findall(r"(--[a-z][a-z0-9-]+)", src)) - {"--help"}
    assert "--damp-percent" in named and "--steps" in named
    for c in have:
        assert named <= have[c], (c, sorted(named - have[c]))
