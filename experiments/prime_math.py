r"""PRIME (and GRPO / RLOO / REINFORCE++ baselines) for math with verifiable rewards.

    python experiments/prime_math.py --flagfile=experiments/configs/smollm2_arith.flags

This file is composition only. The flags are generated from the fields of
`jaxrl_dense.rl.config.RunConfig` (the single source of defaults, ranges and help; `--helpfull`
lists them), the run's state and its two operations live in `jaxrl_dense.rl.trainer.Trainer`,
and one RL step is: `rl.rollout.collect` (sample prompts x oversample -> n responses each ->
decode -> verify -> accuracy-band filter) then `rl.prime.make_prime`'s single jitted
`update_fn` (scoring, implicit-PRM update `--prm_update=before|after`, implicit rewards,
advantages, PPO-clip update, KL / entropy metrics). Other dense-reward methods by flag:
`--filter=prof` (PROF, arXiv 2509.03403), `--advantage=prl` (PRL, arXiv 2601.10201),
`--extra_reward=sar:0.2` (SAR, arXiv 2509.05489).

Every flag is checked before any work (ranges of every float, model directories holding weights,
every row of the data files, output directories, --top_k / --arith_num_eval / --verify_workers
bounds): a bad value, an unknown or malformed flag, or a PRM-only flag (`rl.config.PRM_ONLY`)
typed on the command line with an --algo that has no implicit PRM exits 2 naming the flag (the
same settings in a --flagfile are ignored with a note: one flag file serves every --algo). Steps after the first never
recompile: prompts are left-padded to `--max_prompt_length`, responses right-padded to
`--max_response_length`, and every step has the same number of rows. Multi-host: start the same
command in every process (`mesh_lib.initialize_distributed`; docs/scaling.md, "Multi-process: one
process per host"); each process samples the same seeded prompts, verifies the whole batch and
runs the same program; process 0 writes the logs, all processes write the checkpoints.

Outputs under `--logdir`: metrics.jsonl and TensorBoard events (`metrics.MetricsWriter`; one row
per step: outcome accuracy, filter pass rate, PRM loss / accuracy, advantage statistics, KL to
the reference, entropy, PPO clip fractions, lengths, tokens/s, time/*), and
eval_stepNNNNN*.json reports (`evaluation.write_report`, per-problem results).

Orbax checkpoints every `--checkpoint_every` steps (atomic, the last `--checkpoint_keep` kept)
hold policy + PRM params and optimizer states, the step, the data-iterator state and the metrics
history; RNG keys are derived from (--seed, step), so `--resume` continues exactly. A checkpoint
whose fingerprint (`rl.config.fingerprint`: every setting except the runtime-only ones, and the
content hash of a --train_data file) differs is refused and left untouched (exit 4). A damaged
latest step is skipped with a warning for the newest readable one (nothing deleted); none
readable: exit 4. `--resume` without any checkpoint says so and starts fresh. A NaN / inf loss
stops the run without saving (exit 3).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional

from absl import app, flags

from jaxrl_dense import cli  # noqa: E402
from jaxrl_dense.rl import config as config_lib  # noqa: E402

config_lib.define_flags(config_lib.RunConfig)
FLAGS = flags.FLAGS


_FINITE_KEYS = ("actor/loss", "actor/grad_norm", "prm/loss", "prm/grad_norm")


def check_finite(rec: dict, ckpt_dir: str, last_saved: Optional[int]) -> None:
  bad = [k for k in _FINITE_KEYS if k in rec and not math.isfinite(rec[k])]
  if bad:
    where = (f"the last good checkpoint is step {last_saved} in {ckpt_dir}" if last_saved is not None
             else "no checkpoint was saved")
    from jaxrl_dense.checkpoint import NonFiniteStateError  # nothing of this step is saved
    raise NonFiniteStateError(
        f"step {rec['step']}: {', '.join(f'{k}={rec[k]}' for k in bad)} is not finite; the run stopped "
        f"without saving this step's state ({where}). Lower --lr / --prm_lr or check the data.")


def _fmt(rec: dict) -> str:
  keys = ("outcome/acc", "outcome/acc_sampled", "prm/loss", "prm/dpo_acc", "prm_health/auroc", "actor/pg_loss",
          "actor/clipfrac", "entropy", "response/length_mean", "time/step")
  return " ".join(f"{k.split('/')[-1]}={rec[k]:.4g}" for k in keys if k in rec)


def train(cfg: config_lib.RunConfig) -> list:
  """Runs (or resumes) training; returns the per-step metrics history."""
  import jax
  from jaxrl_dense.observe import metrics as metrics_lib
  from jaxrl_dense.rl import load
  from jaxrl_dense.rl.trainer import Trainer

  ckpt = load.open_checkpointer(cfg)
  trainer = Trainer(cfg)
  history: list = []
  last_saved = None
  restored = False
  if cfg.resume and ckpt is not None and ckpt.latest_step() is not None:
    history = trainer.resume(ckpt)
    last_saved = trainer.step
    restored = True
    skipped = "".join(f" (skipped the unreadable step {s})" for s in sorted(ckpt.unreadable, reverse=True))
    print(f"[resume] restored step {trainer.step} from {cfg.checkpoint_dir}{skipped}")
  elif cfg.resume:
    print(f"[resume] no complete checkpoint in {cfg.checkpoint_dir}; starting from step 0")
  # Multi-process: every process runs the same steps (and Orbax saves / restores with all of
  # them); only process 0 writes metrics.jsonl / TensorBoard / eval reports and prints.
  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)
  log = wandb = None
  if cfg.logdir and lead:
    if cfg.wandb_project:
      from jaxrl_dense.observe.wandb_sink import WandbSink
      flat = config_lib.flat(cfg)
      wandb = WandbSink(cfg.wandb_project, name=os.path.basename(os.path.normpath(cfg.logdir)),
                        config=flat, dir=cfg.logdir, mode=cfg.wandb_mode)
    # Nothing restored: the rows of an earlier attempt (its step-0 eval) are not this run's.
    log = metrics_lib.MetricsWriter(cfg.logdir, fresh=not restored, sinks=[wandb] if wandb else ())
    if restored:
      log.truncate_after(trainer.step)
  # Reward-hacking alarm (prm_health.RewardHackingMonitor, docs/prm_health.md): host-side, over
  # the logged history, so a resumed run rebuilds its window from the checkpointed history.
  monitor = None
  if cfg.prime.uses_prm:
    from jaxrl_dense.observe import prm_health
    monitor = prm_health.RewardHackingMonitor(cfg.hacking_window, cfg.hacking_t)
    for old in history:
      monitor.update(old["step"], old.get("prm_health/implicit_reward_mean", math.nan),
                     old.get("outcome/acc_sampled", math.nan), quiet=True)
  p = cfg.prime
  mc = trainer.model_config
  say(f"[setup] {p.algo} model={cfg.model} ({mc.num_layers} layers, d={mc.hidden_size}) mesh={cfg.mesh} "
      f"devices={jax.device_count()} processes={jax.process_count()} rows/step={p.rollout.rows} "
      f"(sampled {p.rollout.sampled_rows}) setup={trainer.setup_s:.1f}s")

  def write(rec):
    if log is not None:
      log.write(trainer.step, {k: v for k, v in rec.items() if k != "step"})

  def save(force=False):
    nonlocal last_saved
    if ckpt is not None and trainer.save(ckpt, history, force=force):
      last_saved = trainer.step

  bar = None
  try:
    if trainer.step == 0 and cfg.eval_at_start and trainer.eval_records:
      ev = trainer.evaluate("_start")
      say(f"[eval] step 0 pass@1={ev['eval/pass@1']:.4f} on {ev['eval/num']} problems ({ev['time/eval']:.1f}s)")
      write(ev)
    if cfg.progress and lead:
      bar = metrics_lib.ProgressBar(cfg.steps, initial=trainer.step, desc=p.algo)
    while trainer.step < cfg.steps:
      rec = {"step": trainer.step + 1, **trainer.train_step()}
      check_finite(rec, cfg.checkpoint_dir, last_saved)
      if monitor is not None:
        rec.update(monitor.update(trainer.step, rec.get("prm_health/implicit_reward_mean", math.nan),
                                  rec.get("outcome/acc_sampled", math.nan)))
      if cfg.sample_every and cfg.logdir and lead and trainer.step % cfg.sample_every == 0:
        page = trainer.write_samples(os.path.join(cfg.logdir, "samples"))
        if wandb is not None:
          wandb.log_html(trainer.step, "samples/page", page["html"])
          wandb.log_samples(trainer.step, page["page"])
      if cfg.eval_every and trainer.step % cfg.eval_every == 0 and trainer.step < cfg.steps:
        rec.update(trainer.evaluate())
      history.append(rec)
      write(rec)
      if bar is not None:
        bar.update(trainer.step, **{k.split("/")[-1]: rec[k] for k in ("outcome/acc", "prm/loss", "entropy")
                                    if k in rec})
      else:
        say(f"[step {trainer.step}] {_fmt(rec)}")
      if ckpt is not None and cfg.checkpoint_every and ckpt.should_save(trainer.step):
        save()
    if bar is not None:
      bar.close()
    if trainer.eval_records:
      ev = trainer.evaluate("_end")
      say(f"[eval] step {trainer.step} pass@1={ev['eval/pass@1']:.4f} on {ev['eval/num']} problems")
      write(ev)
    if ckpt is not None and last_saved != trainer.step:
      save(force=True)
    if cfg.export_dir:
      trainer.export(cfg.export_dir)
      say(f"[export] policy written to {cfg.export_dir} (Hugging Face format)")
  finally:
    if ckpt is not None:
      ckpt.close()
    if log is not None:
      log.close()
    trainer.close()
  return history


def _simulate_devices(mesh_spec: str) -> None:
  """Adds --xla_force_host_platform_device_count=N (N = the mesh's device count) to XLA_FLAGS so
  that a machine without the accelerators can compile for the mesh on simulated CPU devices."""
  n = 1
  for item in mesh_spec.split(","):
    size = item.split(":", 1)[1] if ":" in item else "1"
    if not size.strip().lstrip("-").isdigit() or int(size) < 1:
      return  # -1 / malformed: the mesh check names it; use the devices there are
    n *= int(size)
  flags_ = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags_:
    os.environ["XLA_FLAGS"] = f"{flags_} --xla_force_host_platform_device_count={n}".strip()


def print_aot_plan(cfg) -> dict:
  """Compiles the step's programs from abstract inputs and prints (and with --plan_json writes)
  the per-device memory plan (`rl.plan.aot_plan`)."""
  import json
  import jax
  from jaxrl_dense.rl import plan as plan_lib
  n = plan_lib.mesh_devices(cfg)
  devices = jax.devices() if len(jax.devices()) >= n else jax.devices("cpu")
  if len(devices) < n:
    raise config_lib.ConfigError("mesh", cfg.mesh, f"needs {n} devices; {len(devices)} available "
                                 "(simulated CPU devices are added only when XLA_FLAGS does not set a count)")
  plan = plan_lib.aot_plan(cfg, devices=devices[:n])
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  print(f"Compiled memory plan (per device; {plan['devices']} {plan['platform']} device(s), mesh "
        f"{plan['mesh']}, params {plan['param_dtype']}, compute {plan['compute_dtype']}):")
  for name, m in plan["programs"].items():
    print(f"  {name:9s} peak {gib(m['peak_bytes'])} = arguments {gib(m['argument_bytes'])} + outputs "
          f"{gib(m['output_bytes'])} + temporaries {gib(m['temp_bytes'])} - aliased {gib(m['alias_bytes'])}")
  print(f"  resident training state {gib(plan['resident_state_bytes'])}; generate + state "
        f"{gib(plan['generate_with_state_bytes'])}")
  print(f"  peak per device: {gib(plan['peak_bytes_per_device'])}")
  print(plan_lib.plan_markdown(plan))
  if cfg.plan_target:
    fit = plan_lib.target_fit(plan["peak_bytes_per_device"], cfg.plan_target, cfg.memory_fraction)
    plan["target"] = fit
    if "need_fraction" in fit:
      print(f"  {fit['target']}: {fit['hbm_gib']} GiB HBM, {fit['reserve_gib']} GiB reserved outside "
            f"JAX's pool; this plan needs --memory_fraction >= {fit['need_fraction']:.2f} (at most "
            f"{fit['max_fraction']:.2f} leaves the reserve); with {fit['memory_fraction']:.2f} "
            f"(pool {fit['pool_gib']} GiB) it {'fits' if fit['fits'] else 'does NOT fit'}")
    else:
      print(f"  {fit['target']}: {fit['budget_gib']} GiB per chip after the runtime's reserve; it "
            f"{'fits' if fit['fits'] else 'does NOT fit'}")
  if cfg.plan_json:
    os.makedirs(os.path.dirname(os.path.abspath(cfg.plan_json)), exist_ok=True)
    with open(cfg.plan_json, "w") as f:
      json.dump(plan, f, indent=1)
    print(f"  written to {cfg.plan_json}")
  return plan


def _fail(code: int, msg: str):
  print(f"prime_math.py: {'stopped' if code == 3 else 'error'}: {msg}", file=sys.stderr)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
  if FLAGS.dry_run and FLAGS.aot:  # before JAX starts: simulated CPU devices for the mesh
    _simulate_devices(FLAGS.mesh)
  if FLAGS.memory_fraction > 0:  # before JAX starts: the GPU pool's size
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{FLAGS.memory_fraction:g}"
  from jaxrl_dense import checkpoint as ckpt_lib
  from jaxrl_dense.rl import load, plan as plan_lib
  from jaxrl_dense.parallel import mesh as mesh_lib
  # Multi-controller start-up before any other JAX call (a no-op for a single process).
  try:
    distributed = mesh_lib.initialize_distributed()
  except ValueError as e:
    _fail(2, str(e))
  try:  # every flag, then the paths and data files, before any model loads
    cfg = config_lib.from_flags(config_lib.RunConfig)
    config_lib.check_applicable(cfg, cli.command_line_flags(sys.argv))
    ignored = config_lib.ignored_settings(cfg)
    if ignored:
      print(f"[setup] --algo={cfg.prime.algo} has no implicit PRM and ignores "
            f"{', '.join('--' + k for k in ignored)} (from the flag file)")
    if cfg.dry_run:
      plan_lib.check_mesh(cfg, plan_lib.mesh_devices(cfg))
      text, problems = plan_lib.plan(cfg)
      print(text)
      if cfg.aot:  # needs the model shape only (--arch when the weights are absent)
        print_aot_plan(cfg)
      print("Problems:\n  " + "\n  ".join(problems) if problems else "All paths and flags are valid.")
      sys.exit(1 if problems else 0)
    plan_lib.check_mesh(cfg)
    load.check_inputs(cfg)
    load.configure_compilation_cache(cfg)  # before the first compilation
    train(cfg)
  except config_lib.ConfigError as e:
    _fail(2, str(e))
  except ckpt_lib.NonFiniteStateError as e:
    _fail(3, str(e))
  except (ckpt_lib.CheckpointMismatchError, ckpt_lib.CheckpointReadError) as e:
    _fail(4, str(e))
  if distributed:
    import jax
    jax.distributed.shutdown()


if __name__ == "__main__":
  cli.run(main)
