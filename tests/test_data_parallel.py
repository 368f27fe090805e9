"""Scaling-out section (8.1): data-parallel PPO through accelerate, 2 CPU processes joined by gloo, tiny model."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import unit_cfg
from nbimport import ROOT, load_notebook
from rlft_support import parallel

PROMPTS = [f"Question number {i}?" for i in range(4)]
REFERENCES = [f"Answer number {i}." for i in range(4)]
K = 2  # answers per prompt: 8 rows, 4 on each rank


def text_reward(prompts, responses, references):
    """A deterministic reward of the text alone (so both runs score the fixed batch alike)."""
    return torch.tensor([float(len(r) % 7) for r in responses])


def fixed_batch_state(nb, advantage: str, ptx_coef: float):
    """A PPO state on the tiny model (seeded) and one rollout of the combined 8-row batch, the same in every
    process (one thread, seeded)."""
    nb.seed_everything(0)
    model, tok = nb.load_base("tiny", "~/.cache/rlft", torch.device("cpu"), torch.float32, seed=0)
    lora = nb.add_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    cfg = unit_cfg(PPO_BATCH_SIZE=len(PROMPTS) * K, PPO_SAMPLES_PER_PROMPT=K, PPO_MINIBATCH_SIZE=3, PPO_EPOCHS=2,
                   MAX_NEW_TOKENS=6, TEMPERATURE=1.0, ADVANTAGE=advantage, PTX_COEF=ptx_coef,
                   REWARD_NORM="group" if advantage == "group" else "running", KL_COEF=0.05)
    state = nb.make_ppo_state(lora, tok, cfg)
    prompts, references = nb.repeat_each(PROMPTS, K), nb.repeat_each(REFERENCES, K)
    nb.seed_everything(1)
    return state, nb.rollout(state, prompts, references, text_reward), prompts, references


def rows_of(ro, lo: int, hi: int):
    """Rows lo..hi−1 of a Rollout (every per-row tensor and list)."""
    rows = ro.sequences.shape[0]
    cut = lambda v: v[lo:hi] if (torch.is_tensor(v) or isinstance(v, list)) and len(v) == rows else v
    return dataclasses.replace(ro, **{f.name: cut(getattr(ro, f.name)) for f in dataclasses.fields(ro)})


def one_iteration(nb, state, ro, prompts, references, lo, hi):
    """ppo_iteration over the fixed batch's rows lo..hi−1 (its rollout replaced by those rows)."""
    real = nb.rollout
    nb.rollout = lambda *args: rows_of(ro, lo, hi)
    try:
        nb.seed_everything(2)  # the same minibatch permutation in every run (rank 0's is broadcast)
        return nb.ppo_iteration(state, prompts[lo:hi], references[lo:hi], text_reward)
    finally:
        nb.rollout = real


def trained(state) -> dict:
    out = {f"lora.{n}": p.detach().clone() for n, p in state.policy.named_parameters() if p.requires_grad}
    out.update({f"value.{n}": p.detach().clone() for n, p in state.value_head.named_parameters()})
    return out


def summary(state, stats) -> dict:
    return {"reward_stats": state.reward_stats.state_dict(), "kl_coef": state.kl_ctl.beta,
            "counters": state.counters, "approx_kl": stats["approx_kl"], "epochs_done": stats["epochs_done"],
            "reduced_bytes": state.comm.reduced_bytes,
            "bytes_per_step": None}


def rank_iteration(out_dir: str, advantage: str, ptx_coef: float) -> None:
    """One rank of the 2-process run (launched by parallel.launch_local): its half of the fixed batch."""
    from accelerate import Accelerator
    nb = load_notebook()
    accelerator = Accelerator(cpu=True)
    state, ro, prompts, references = fixed_batch_state(nb, advantage, ptx_coef)
    parallel.enable_data_parallel(state, accelerator, seed=0)
    b = len(prompts) // accelerator.num_processes
    lo = accelerator.process_index * b
    stats = one_iteration(nb, state, ro, prompts, references, lo, lo + b)
    out = Path(out_dir)
    save_file(trained(state), out / f"rank{accelerator.process_index}.safetensors")
    info = summary(state, stats)
    info["bytes_per_step"] = parallel.allreduce_bytes_per_step(state)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(info))


@pytest.mark.parametrize("advantage,ptx_coef", [("group", 0.5), ("gae", 0.0)])
def test_two_processes_equal_one_process_on_the_combined_batch(nb, tmp_path, one_thread, advantage, ptx_coef):
    parallel.launch_local(rank_iteration, (str(tmp_path), advantage, ptx_coef), num_processes=2)
    state, ro, prompts, references = fixed_batch_state(nb, advantage, ptx_coef)
    before = trained(state)
    stats = one_iteration(nb, state, ro, prompts, references, 0, len(prompts))
    single = trained(state)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    moved = [k for k in single if "lora_B" in k and not torch.equal(single[k], before[k])]
    assert moved, "the iteration did not change the LoRA (the check would be vacuous)"
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: the ranks' weights differ"
        assert torch.allclose(ranks[0][name], single[name], atol=1e-5, rtol=0), \
            f"{name}: max diff {(ranks[0][name] - single[name]).abs().max().item():.2e}"
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0] == info[1]
    expected = summary(state, stats)
    for key in ("counters", "epochs_done"):
        assert info[0][key] == expected[key], key
    for key in ("mean", "var"):
        assert info[0]["reward_stats"][key] == pytest.approx(expected["reward_stats"][key], abs=1e-6)
    assert info[0]["reward_stats"]["count"] == expected["reward_stats"]["count"] == len(prompts)
    assert info[0]["kl_coef"] == pytest.approx(expected["kl_coef"], rel=1e-6)
    assert info[0]["approx_kl"] == pytest.approx(expected["approx_kl"], abs=1e-6)
    # the gradient all-reduce is the only per-step traffic of any size: the trainable parameters, fp32
    steps = stats["epochs_done"] * 3  # 8 rows in minibatches of 3: 3 optimizer steps per epoch
    assert info[0]["reduced_bytes"] == steps * info[0]["bytes_per_step"]
    assert info[0]["bytes_per_step"] == 4 * sum(p.numel() for p in state.trainable_parameters())


SFT_PAIRS = [{"prompt": f"Question number {i}?", "reference": "Answer" + " more" * i + "."} for i in range(8)]
# held out, but of the training pairs' kind, so the NLL falls and the stopper restores a trained step: 2 + 1 rows
SFT_HELD = [{"prompt": f"Question number {i}?", "reference": "Answer" + " more" * i + "."} for i in range(8, 11)]


def sft_run(nb, comm=None):
    """sft_train on the tiny model: 3 steps of 4 references of unequal length (so the ranks' token shares
    differ), the held-out NLL checked at every step on 3 prompts (which 2 ranks split unevenly)."""
    nb.seed_everything(0)
    model, tok = nb.load_base("tiny", "~/.cache/rlft", torch.device("cpu"), torch.float32, seed=0)
    lora = nb.add_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    stopper = nb.HeldOutStop(lora, tok, SFT_HELD, every=1, patience=10, batch_size=2, comm=comm)
    logs = nb.sft_train(lora, tok, nb.PromptSampler(SFT_PAIRS, 0), budget_s=1e9, max_steps=3, batch_size=4,
                        lr=3e-3, progress=False, stopper=stopper, comm=comm)
    weights = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    return weights, [{k: r[k] for k in ("step", "loss", "val_nll", "restored_step") if k in r} for r in logs]


def rank_sft(out_dir: str) -> None:
    """One rank of the 2-process SFT run: its half of every batch and of the held-out scoring."""
    from accelerate import Accelerator
    nb = load_notebook()
    comm = parallel.DataParallel(Accelerator(cpu=True))
    weights, logs = sft_run(nb, comm)
    save_file(weights, Path(out_dir) / f"sft{comm.rank}.safetensors")
    (Path(out_dir) / f"sft{comm.rank}.json").write_text(json.dumps({"logs": logs, "reduced": comm.reduced_bytes}))


def test_two_process_sft_equals_one_process_on_the_whole_batch(nb, tmp_path, one_thread):
    parallel.launch_local(rank_sft, (str(tmp_path),), num_processes=2)
    single, single_logs = sft_run(nb)
    ranks = [load_file(tmp_path / f"sft{r}.safetensors") for r in (0, 1)]
    assert single_logs[-1]["restored_step"] > 0, "the stopper kept the untrained adapter (the check would be vacuous)"
    assert any(v.abs().sum() > 0 for k, v in single.items() if "lora_B" in k), "SFT did not move the LoRA"
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: the ranks' weights differ"
        assert torch.allclose(ranks[0][name], single[name], atol=1e-5, rtol=0), \
            f"{name}: max diff {(ranks[0][name] - single[name]).abs().max().item():.2e}"
    info = [json.loads((tmp_path / f"sft{r}.json").read_text()) for r in (0, 1)]
    assert info[0]["logs"] == info[1]["logs"]
    assert [r["step"] for r in info[0]["logs"]] == [r["step"] for r in single_logs] == [1, 2, 3]
    for mine, ref in zip(info[0]["logs"], single_logs):
        assert mine["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert mine["val_nll"] == pytest.approx(ref["val_nll"], abs=1e-5)
    assert info[0]["logs"][-1]["restored_step"] == single_logs[-1]["restored_step"]
    lora_bytes = 4 * sum(v.numel() for v in single.values())
    assert info[0]["reduced"] == 3 * lora_bytes  # one gradient all-reduce per SFT step, the LoRA only


def fake_ranks(rank: int, world: int) -> parallel.DataParallel:
    """A DataParallel of rank `rank` of `world` on a stand-in accelerator (for what needs no collective)."""
    import types
    return parallel.DataParallel(types.SimpleNamespace(process_index=rank, num_processes=world,
                                                       is_main_process=rank == 0))


def test_sft_stage_refuses_a_batch_that_does_not_split_over_the_ranks(nb, cfg, tmp_path):
    with pytest.raises(ValueError, match="SFT_BATCH_SIZE=8 does not split evenly over 3 processes"):
        nb.sft_stage(None, None, [], tmp_path, dataclasses.replace(cfg, SFT_BATCH_SIZE=8), 1.0, False,
                     comm=fake_ranks(0, 3))


def test_own_rows_splits_whole_prompts_and_refuses_an_uneven_split():
    comm = fake_ranks(1, 2)
    assert comm.own(list("abcd")) == ["c", "d"]
    assert torch.equal(comm.own_indices(torch.tensor([5, 0, 2, 7]), 4), torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="do not split evenly over 2 ranks"):
        comm.own(list("abc"))


def test_single_process_is_the_identity():
    one, x, idx = parallel.SingleProcess(), torch.arange(6.0).view(3, 2), torch.tensor([2, 0])
    assert all(f(x) is x for f in (one.gather, one.sum, one.broadcast, one.own))
    assert one.own(list("abc")) == list("abc") and one.own_indices(idx, 3) is idx
    assert one.all(True) is True and one.all(False) is False
    assert (one.rank, one.world, one.is_main, one.reduced_bytes, one.reduce_grads) == (0, 1, True, 0, None)
    one.barrier()


def test_benchmark_smoke_two_ranks_and_the_report(tmp_path, one_thread):
    """benchmarks/data_parallel.py on the tiny model: one real 2-process launch (the notebook's run_iteration on
    each rank), then the report from it (the lead runs the real, alternated benchmark alone)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import data_parallel as bench
    P = bench.notebook_config(**bench.overrides_of(str(ROOT / "tests" / "tiny_params.json"), [
        "PPO_BATCH_SIZE=4", "PPO_SAMPLES_PER_PROMPT=2", "PPO_MINIBATCH_SIZE=2", "PPO_EPOCHS=1", "MAX_NEW_TOKENS=3",
        "SFT_BATCH_SIZE=4"]))
    P = dataclasses.replace(P, CACHE_DIR=str(Path(P.CACHE_DIR).expanduser()))
    record = bench.measure(P, "2p1t", 1, 2, 0, tmp_path)
    assert record["world"] == 2 and len(record["seconds"]) == 1 and record["seconds"][0] > 0
    assert len(record["sft_seconds"]) == 2 and min(record["sft_seconds"]) > 0
    assert record["reduced_bytes"] == 2 * 2 * record["bytes_per_step"]  # 2 iterations x 2 minibatches of 2 rows
    assert record["sft_reduced_bytes"] == 3 * record["sft_bytes_per_step"]  # 1 warm-up + 2 SFT steps, the LoRA only
    records = {name: [dict(record, seconds=[s], sft_seconds=[s / 4])]
               for name, s in (("1p2t", 2.0), ("1p1t", 4.0), ("2p1t", 2.5))}
    r = bench.summarize(P, records, (1.0, 1, 1), (2.0, 2, 2), 1, 1)
    assert r["samples_per_s_1p1t"] == 1.0 and r["samples_per_s_2p1t"] == 1.6 and r["speedup_2p_vs_1p1t"] == 1.6
    assert r["sft_samples_per_s_1p1t"] == 4.0 and r["sft_speedup_2p_vs_1p1t"] == 1.6
    assert r["allreduce_bytes_per_step"] == record["bytes_per_step"] and r["optimizer_steps_per_iteration"] == 2
    bench.write_report(str(tmp_path / "dp"), r, bench.markdown_report(r))
    assert json.loads((tmp_path / "dp.json").read_text())["speedup_2p_vs_1p2t"] == 0.8
    assert "2 processes x 1 thread (gloo) | 1.600" in (tmp_path / "dp.md").read_text()


PAIRS = [{"prompt": f"Question number {i}?", "reference": f"Answer number {i}.", "split": "train", "family": "f"}
         for i in range(10)]


def watch_writes(folders: list[Path]) -> list[str]:
    """An audit hook that records every file-system write (open for writing, rename/replace, remove, mkdir,
    rmtree) under `folders`; returns the (growing) list of them."""
    import os
    seen, roots = [], [str(Path(f).resolve()) for f in folders]
    inside = lambda path: isinstance(path, (str, bytes, os.PathLike)) and any(
        os.path.abspath(os.fsdecode(path)).startswith(r) for r in roots)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event, args):
        if event == "open" and inside(args[0]):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and set(mode) & set("wax+")) or (isinstance(flags, int) and flags & write_flags):
                seen.append(f"open {args[0]} {mode}")
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "shutil.copyfile") \
                and any(inside(a) for a in args[:2]):
            seen.append(f"{event} {args[0]}")
    sys.addaudithook(hook)
    return seen


def rank_train(run_dir: str, out_dir: str, iters: int) -> None:
    """One rank of a 2-process train_loop run (tiny model): rank 1 watches run_dir for writes."""
    from accelerate import Accelerator
    nb = load_notebook()
    accelerator = Accelerator(cpu=True)
    rank, out = accelerator.process_index, Path(out_dir)
    writes = watch_writes([Path(run_dir), out / "probe"]) if rank > 0 else []
    nb.seed_everything(0)
    model, tok = nb.load_base("tiny", "~/.cache/rlft", torch.device("cpu"), torch.float32, seed=0)
    lora = nb.add_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    cfg = unit_cfg(PPO_BATCH_SIZE=8, PPO_SAMPLES_PER_PROMPT=2, PPO_MINIBATCH_SIZE=4, PPO_EPOCHS=1, MAX_NEW_TOKENS=5,
                   TEMPERATURE=1.0, ADVANTAGE="group", REWARD_NORM="group")
    state = nb.make_ppo_state(lora, tok, cfg)
    parallel.enable_data_parallel(state, accelerator, seed=0)
    logs = nb.train_loop(state, nb.PromptSampler(PAIRS, 0), text_reward, run_dir, budget_s=1e9, max_iterations=iters,
                         ckpt_every=1, progress=False)
    if rank > 0:
        (out / "probe").mkdir()  # the hook must see this one (else the check would be vacuous)
    save_file(trained(state), out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps({"writes": writes, "iterations": len(logs)}))


def test_only_rank_0_writes_files_and_the_ranks_stay_equal(tmp_path, one_thread):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    parallel.launch_local(rank_train, (str(run_dir), str(out), 2), num_processes=2)
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0]["iterations"] == info[1]["iterations"] == 2
    assert info[1]["writes"] == [f"os.mkdir {out / 'probe'}"], info[1]["writes"]  # rank 1 wrote nothing else
    assert json.loads((run_dir / "latest").read_text()) == {"checkpoint": "ckpt-000002"}  # rank 0 wrote the run
    assert len((run_dir / "train_log.jsonl").read_text().splitlines()) == 2
    a, b = (load_file(out / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)
    # the run's checkpoints are refused by a run with another number of processes (here: one)
    nb = load_notebook()
    nb.seed_everything(0)
    model, tok = nb.load_base("tiny", "~/.cache/rlft", torch.device("cpu"), torch.float32, seed=0)
    state = nb.make_ppo_state(nb.add_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"]), tok, unit_cfg(
        PPO_BATCH_SIZE=8, PPO_SAMPLES_PER_PROMPT=2, PPO_MINIBATCH_SIZE=4, PPO_EPOCHS=1, MAX_NEW_TOKENS=5,
        TEMPERATURE=1.0, ADVANTAGE="group", REWARD_NORM="group"))
    with pytest.warns(UserWarning, match="written by a run of 2 data-parallel processes and this run has 1"), \
            pytest.raises(nb.CheckpointError, match="no usable checkpoint"):
        nb.train_loop(state, nb.PromptSampler(PAIRS, 0), text_reward, run_dir, budget_s=1e9, max_iterations=3,
                      resume=True, progress=False)


def rank_resumable(run_dir: str, out_dir: str, iters: int, resume: bool, stall_at: int) -> None:
    """One rank of a 2-process train_loop run that rank 0 stalls (sleeps) at iteration `stall_at` (-1: never),
    after saying so in out_dir/stalled, so that the test can SIGKILL the whole run there."""
    import time
    from accelerate import Accelerator
    nb = load_notebook()
    accelerator = Accelerator(cpu=True)
    nb.seed_everything(0)
    model, tok = nb.load_base("tiny", "~/.cache/rlft", torch.device("cpu"), torch.float32, seed=0)
    cfg = unit_cfg(PPO_BATCH_SIZE=8, PPO_SAMPLES_PER_PROMPT=2, PPO_MINIBATCH_SIZE=3, PPO_EPOCHS=2, MAX_NEW_TOKENS=5,
                   TEMPERATURE=1.0, ADVANTAGE="group", REWARD_NORM="group", PTX_COEF=0.5)
    state = nb.make_ppo_state(nb.add_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"]), tok, cfg)
    parallel.enable_data_parallel(state, accelerator, seed=0)

    def reward(prompts, responses, references):
        if state.iteration == stall_at and accelerator.is_main_process:  # generated, not yet updated
            (Path(out_dir) / "stalled").write_text("")
            time.sleep(600)
        return text_reward(prompts, responses, references)
    nb.train_loop(state, nb.PromptSampler(PAIRS, 0), reward, run_dir, budget_s=1e9, max_iterations=iters,
                  ckpt_every=1, resume=resume, progress=False)
    save_file(trained(state), Path(out_dir) / f"final{accelerator.process_index}.safetensors")


def timeless(path: Path) -> list[dict]:
    """The log's records without the wall-clock fields (and NaN made comparable)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: ("nan" if isinstance(v, float) and v != v else v) for k, v in r.items()
             if "second" not in k and k not in ("elapsed_s", "tokens_per_s") and not k.startswith("t_")}
            for r in records]


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_ends_where_an_uninterrupted_one_ends(tmp_path, one_thread):
    import os
    import signal
    import subprocess
    import time
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for d in (straight, killed):
        d.mkdir()
    code = ("import sys; sys.path[:0] = [{tests!r}, {root!r}]; import test_data_parallel as t; "
            "t.parallel.launch_local(t.rank_resumable, ({run!r}, {out!r}, 5, False, 3), num_processes=2)").format(
        tests=str(ROOT / "tests"), root=str(ROOT), run=str(killed / "run"), out=str(killed))
    victim = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parallel.launch_local(rank_resumable, (str(straight / "run"), str(straight), 5, False, -1), num_processes=2)
    deadline = time.time() + 300
    while not (killed / "stalled").exists():
        assert victim.poll() is None, victim.stdout.read()[-3000:]
        assert time.time() < deadline, "the run never reached iteration 3"
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)  # both ranks and their launcher, mid-iteration
    victim.wait()
    assert json.loads((killed / "run" / "latest").read_text()) == {"checkpoint": "ckpt-000003"}
    assert not (killed / "final0.safetensors").exists()
    parallel.launch_local(rank_resumable, (str(killed / "run"), str(killed), 5, True, -1), num_processes=2)
    for r in (0, 1):
        a, b = load_file(straight / f"final{r}.safetensors"), load_file(killed / f"final{r}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), r
    log_a, log_b = timeless(straight / "run" / "train_log.jsonl"), timeless(killed / "run" / "train_log.jsonl")
    assert len(log_a) == 5 and log_a == log_b


def test_num_processes_runs_the_pipeline_on_two_forked_ranks_and_the_kernel_gets_the_adapter(nb, cfg, tmp_path,
                                                                                              one_thread):
    """NUM_PROCESSES > 1: the training cell's run_pipeline_parallel (accelerate's notebook_launcher, forked from
    this process as from a kernel); the model here then holds rank 0's final adapter."""
    P = dataclasses.replace(cfg, **{**json.loads((ROOT / "tests" / "tiny_params.json").read_text()), "TRAIN_BUDGET_S": 8,
                            "PPO_BATCH_SIZE": 8, "PPO_MINIBATCH_SIZE": 4, "EVAL_MONITOR_N": 2,
                            "RUN_DIR": str(tmp_path / "run"), "PIPELINE": "sft+rl", "SFT_FRACTION": 0.3,
                            "SFT_BATCH_SIZE": 4})  # both stages through the ranks
    nb.seed_everything(0)
    base, tok = nb.load_base("tiny", "~/.cache/rlft", torch.device("cpu"), torch.float32, seed=0)
    model = nb.add_lora(base, P.LORA_R, P.LORA_ALPHA, P.LORA_DROPOUT, P.LORA_TARGETS)
    pairs = [dict(p, split="train") for p in PAIRS]
    result = parallel.run_pipeline_parallel(2, model, tok, pairs, text_reward, tmp_path / "run", P,
                                            run_fn=nb.run_pipeline)
    assert result.iterations > 0 and len(result.rl_logs) == result.iterations and result.state is None
    assert result.sft_steps > 0 and (tmp_path / "run" / nb.SFT_ADAPTER / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "run" / parallel.DP_RESULT).read_text())["processes"] == 2
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    live = nb.get_peft_model_state_dict(model)
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in live.items() if "lora_B" in k)  # trained, not the fresh adapter


def interrupted_kernel(run_dir: str, marker: str) -> None:
    """A stand-in for a notebook kernel (its own process group, as Jupyter starts one): NUM_PROCESSES = 2 through
    run_pipeline_parallel, RL only, no periodic checkpoints; rank 0 says when iteration 2 is under way (marker)
    and dawdles there, so that the test's interrupt lands mid-iteration. Prints the returned result (JSON)."""
    import os
    import time
    from nbimport import notebook_config
    nb = load_notebook()
    torch.set_num_threads(1)
    P = notebook_config(**{**json.loads((ROOT / "tests" / "tiny_params.json").read_text()),
                           "TRAIN_BUDGET_S": 600, "TRAIN_MAX_ITERS": 50, "PPO_BATCH_SIZE": 8, "PPO_MINIBATCH_SIZE": 4,
                           "PIPELINE": "rl", "CKPT_EVERY": 0, "CKPT_EVERY_S": 0, "RUN_DIR": run_dir, "RESUME": False})
    nb.seed_everything(0)
    base, tok = nb.load_base("tiny", "~/.cache/rlft", torch.device("cpu"), torch.float32, seed=0)
    model = nb.add_lora(base, P.LORA_R, P.LORA_ALPHA, P.LORA_DROPOUT, P.LORA_TARGETS)
    calls = []

    def reward(prompts, responses, references):
        calls.append(1)
        if len(calls) == 3 and os.environ.get("RANK") == "0":  # iteration 2, generated, not yet updated
            Path(marker).write_text("")
            time.sleep(5)
        return text_reward(prompts, responses, references)
    pairs = [dict(p, split="train") for p in PAIRS]
    result = parallel.run_pipeline_parallel(2, model, tok, pairs, reward, run_dir, P, run_fn=nb.run_pipeline)
    print("RESULT " + json.dumps({"iterations": result.iterations, "logs": len(result.rl_logs)}), flush=True)


def test_interrupting_a_two_rank_run_saves_on_rank_0_and_returns_like_one_process(tmp_path):
    """Issue 35 item 4: Ctrl-C in the notebook (SIGINT to the kernel's process group, ranks included) used to raise
    SignalException in the kernel and could kill rank 0 before it saved. Now every rank stops at the same point,
    rank 0 saves the last completed iteration, and run_pipeline_parallel returns the result."""
    import os
    import signal
    import subprocess
    import time
    run_dir, marker = tmp_path / "run", tmp_path / "iteration2"
    code = ("import sys; sys.path[:0] = [{tests!r}, {root!r}]; import test_data_parallel as t; "
            "t.interrupted_kernel({run!r}, {marker!r})").format(tests=str(ROOT / "tests"), root=str(ROOT),
                                                               run=str(run_dir), marker=str(marker))
    kernel = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert kernel.poll() is None, kernel.stdout.read()[-3000:]
            assert time.time() < deadline, "the run never reached iteration 2"
            time.sleep(0.1)
        os.killpg(kernel.pid, signal.SIGINT)  # what Jupyter's interrupt does: the kernel and its forked ranks
        out, _ = kernel.communicate(timeout=300)
    finally:
        if kernel.poll() is None:
            os.killpg(kernel.pid, signal.SIGKILL)
    assert kernel.returncode == 0, out[-3000:]
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert result == {"iterations": 2, "logs": 2}, out[-3000:]  # iteration 2 was rolled back, 0 and 1 kept
    assert json.loads((run_dir / "latest").read_text()) == {"checkpoint": "ckpt-000002"}  # saved on the interrupt
    assert len((run_dir / "train_log.jsonl").read_text().splitlines()) == 2
    assert json.loads((run_dir / parallel.DP_RESULT).read_text())["iterations"] == 2
