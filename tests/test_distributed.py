"""Calibration shared by several processes (gloo on the CPU, launched with torch's launcher as `accelerate launch`
would): the same file as one process, a killed launch resumed by a launch of another size, and merge-many."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from click.testing import CliRunner

from lorasched.cli import main

RUNS = ["--prompts", "a photo of sks dog", "--prompts", "sks dog in watercolor", "--seeds", "0,1,2,3,4,5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the in-process reference runs on one thread too (conftest)


def _merge_args(base, pair, output, steps=6):
    return ["merge", "--base", str(base), "--subject", str(pair[0]), "--style", str(pair[1]), "--method",
            "feature-kl", *RUNS, "--steps", str(steps), "--resolution", "32", "--batch-size", "1", "-o", str(output)]


def _launch(processes: int, args: list[str]):
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={port}", "-m", "lorasched", *args]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_write_the_same_file_as_one_and_a_killed_launch_resumes(tiny_base, kohya_pair, tmp_path):
    single, double, killed = (tmp_path / name for name in ("single", "double", "killed"))
    for folder in (single, double, killed):
        folder.mkdir()
    result = CliRunner().invoke(main, _merge_args(tiny_base, kohya_pair, single / "out.safetensors"))
    assert result.exit_code == 0, result.output

    launch = _launch(2, _merge_args(tiny_base, kohya_pair, double / "out.safetensors"))
    output = launch.communicate(timeout=600)[0]
    assert launch.returncode == 0, output
    assert output.count("wrote ") == 1, "only the main process writes and reports"
    assert (double / "out.safetensors").read_bytes() == (single / "out.safetensors").read_bytes()
    log = "out.safetensors.calibration.jsonl"
    assert (double / log).read_text() == (single / log).read_text(), "the shards fold into a single-process log"
    assert not list(double.glob("*.shard*"))

    # What a launch of two killed after each process finished its first run leaves behind (deterministic, no
    # timing): the main log's header, and per process a shard with its header and the runs it finished (batches of
    # one run, dealt round-robin: rank r's first run is run r).
    header, *runs = (single / log).read_text().splitlines()
    (killed / log).write_text(header + "\n")
    for rank in (0, 1):
        (killed / f"{log}.shard{rank}").write_text(f"{header}\n{runs[rank]}\n")
    rerun = CliRunner().invoke(main, _merge_args(tiny_base, kohya_pair, killed / "out.safetensors"))
    assert rerun.exit_code == 0, rerun.output  # one process now: the dead launch's shards count as done
    assert sorted((killed / log).read_text().splitlines()) == sorted((single / log).read_text().splitlines())
    assert (killed / "out.safetensors").read_bytes() == (single / "out.safetensors").read_bytes()
    assert not list(killed.glob("*.shard*"))


def test_merge_many_runs_each_row_skips_what_is_up_to_date_and_reports_a_bad_row(tiny_base, kohya_pair, tmp_path):
    subject, style = kohya_pair
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "subject,style,method,options,output\n"
        f"{subject},{style},klora,--pattern s*,{tmp_path / 'a.safetensors'}\n"
        f"{subject},{tmp_path / 'missing.safetensors'},klora,,{tmp_path / 'b.safetensors'}\n"
        f"{subject},{style},est,--beta 0.4 --steps 12,{tmp_path / 'c.safetensors'}\n"
    )
    args = ["merge-many", str(manifest), "--base", str(tiny_base), "--jobs", "2"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 2, first.output
    lines = first.stdout.splitlines()
    assert lines[0].split() == ["row", "output", "seconds", "status"] and lines[-1] == "3 rows: 2 done, 1 failed"
    assert "wrote" in lines[1] and "klora" in lines[1] and "wrote" in lines[3] and "est" in lines[3]
    assert "error:" in lines[2] and "missing.safetensors" in lines[2] and len(lines) == 5
    assert not (tmp_path / "b.safetensors").exists()
    a = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "alone").mkdir()
    alone = CliRunner().invoke(main, ["merge", "--base", str(tiny_base), "--subject", str(subject), "--style",
                                      str(style), "--pattern", "s*", "-o", str(tmp_path / "alone" / "a.safetensors")])
    assert alone.exit_code == 0 and (tmp_path / "alone" / "a.safetensors").read_bytes() == a, "a row = a merge"

    again = CliRunner().invoke(main, args)
    lines = again.stdout.splitlines()
    assert "up to date" in lines[1] and "up to date" in lines[3] and "error:" in lines[2]
    assert (tmp_path / "a.safetensors").read_bytes() == a


def test_a_manifest_without_its_columns_is_one_line(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,style\nx,y\n")
    result = CliRunner().invoke(main, ["merge-many", str(manifest), "--base", "b"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "missing: method, options, output" in result.stderr


def test_verify_shared_by_two_processes_reports_what_one_process_reports(tiny_base, kohya_pair, tmp_path):
    import json

    scheduled = tmp_path / "k.safetensors"
    assert CliRunner().invoke(main, ["merge", "--base", str(tiny_base), "--subject", str(kohya_pair[0]), "--style",
                                     str(kohya_pair[1]), "--steps", "5", "-o", str(scheduled)]).exit_code == 0
    args = ["verify", str(scheduled), "--base", str(tiny_base), *RUNS[:4], "--seeds", "3,4", "--resolution", "32",
            "--mode", "fused"]
    one = CliRunner().invoke(main, [*args, "--report", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    launch = _launch(2, [*args, "--report", str(tmp_path / "two")])
    output = launch.communicate(timeout=600)[0]
    assert launch.returncode == 0 and output.count("agreement ") == 1, output

    def numbers(folder):
        report = json.loads((folder / "report.json").read_text())
        return {key: value for key, value in report.items() if not key.startswith("seconds")}

    assert numbers(tmp_path / "two") == numbers(tmp_path / "one")
    assert (tmp_path / "two" / "agreement.png").exists()
