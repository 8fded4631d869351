"""diffusers.md from the results of `scoreaction bench --task diffusers` (experiments/diffusers_bench.py) alone."""

from __future__ import annotations

import math

from scoreaction.experiments.diffusers_jobs import MATCHED, TRL


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b and math.isfinite(a) and math.isfinite(b) else None


def shapes_of(results) -> list[tuple[int, int]]:
    return list(dict.fromkeys((c.steps, c.batch_size) for c in results.cells))


def labels_of(results) -> list[str]:
    return list(dict.fromkeys(c.label for c in results.cells))


def cell(results, label: str, shape: tuple[int, int]):
    """The measured (not failed) cell of this label at (K, B), or None."""
    for c in results.cells:
        if c.label == label and (c.steps, c.batch_size) == shape and c.error is None:
            return c
    return None


def max_load(results) -> float:
    return max([c.load_start[0] for c in results.cells] + [results.machine["load_average_start"][0]])


def header(results, title: str = "Diffusers benchmark: scoreaction's updates beside TRL's DDPOTrainer") -> list[str]:
    """The title, the command and the provenance: date, commit, machine, versions, load, wall time."""
    m, v, cfg = results.machine, results.versions, results.config
    loads = [", ".join(f"{x:.2f}" for x in m[key]) for key in ("load_average_start", "load_average_end")]
    device = m["device"] + (f" ({m['gpu']})" if m.get("gpu") else "")
    loaded = " (above 2.5: the machine was loaded, timings are slower than on an idle one)" if max_load(results) > 2.5 \
        else ""
    lines = [f"# {title}", "", "```", results.command, "```",
             "", f"- Date: {results.date}; commit {results.git}",
             f"- Machine: {m['cpu_count']} CPUs ({m['processor']}), {m['platform']}, Python {m['python']}; device "
             f"{device}; {cfg.threads} torch thread(s) per process, "
             + ("one configuration at a time" if cfg.workers == 1 else f"{cfg.workers} configurations at a time"),
             "- Versions: " + ", ".join(f"{name} {v[name] or 'not installed'}" for name in v),
             f"- Load average (1, 5, 15 min): {loads[0]} at the start, {loads[1]} at the end; the last column of the "
             f"first table is the 1-min load when that configuration started{loaded}",
             f"- Wall time: {results.wall_seconds / 60:.1f} min", ""]
    if cfg.quick:
        lines += ["**Quick mode: tiny budgets, configurations run two at a time, the numbers mean nothing.**", ""]
    if results.trl_skipped:
        lines += [f"**{results.trl_skipped}.**", ""]
    return lines


def settings(results) -> list[str]:
    cfg = results.config
    model = {"tiny": "tiny-sd (models/pipeline.py build_tiny: SD-1.5 architecture, random weights, 8x8x4 latents, "
                     "32 px)",
             "sd15": "the SD-1.5 architecture with random weights (diffusers_bench.build_random_sd15), 64x64x4 "
                     "latents, 512 px"}[cfg.preset]
    backward = ("B / minibatches transitions per backward pass (micro_batch), as TRL's" if cfg.micro_batch == "trl"
                else "each minibatch's K·B / minibatches transitions in one pass (TrainConfig's default); rows marked"
                     f"{MATCHED}: B / minibatches per pass (micro_batch), as TRL's")
    rows = [("pipeline", f"{model}, saved once with save_pretrained; both sides load that folder (local files only)"),
            ("precision", "fp32" if cfg.preset == "tiny" else "frozen weights bf16 (ours: task.precision; TRL: "
                                                               "mixed_precision), LoRA weights fp32"),
            ("DDIM steps K, batch sizes B", f"{cfg.steps}, {cfg.batch_sizes} (rollouts: the whole batch at once)"),
            ("guidance scale, eta", f"{cfg.guidance_scale:g}, {cfg.eta:g}"),
            ("LoRA", f"rank {cfg.lora_rank}, alpha {cfg.lora_rank}, targets to_k, to_q, to_v, to_out.0 (both sides)"),
            ("epochs x minibatches per update", f"{cfg.epochs} x {cfg.minibatches} optimiser steps (TRL: "
             f"train_num_inner_epochs {cfg.epochs}, train_batch_size B / {cfg.minibatches}, each step accumulating "
             "the gradients of all K timesteps, one backward pass per timestep)"),
            ("scoreaction's backward passes", backward),
            ("learning rate, PPO clip", f"{cfg.lr:g}, 1e-4 on the log-ratio averaged over the latent (ours: "
                                        "algo.ratio mean)"),
            ("reward", "JPEG compressibility (rewards/images.py), the same function on both sides"),
            ("beta_KL", f"0 (DDPO's setting) on both sides; {cfg.beta_kl:g} for scoreaction's "
                        f"{', '.join(cfg.kl_algorithms) or 'none'} (+ KL rows)"),
            ("measured", f"{cfg.warmup} warm-up update(s), then the median of {cfg.updates}, each configuration in a "
                         "fresh process")]
    return ["## Settings", "", "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def per_update(results) -> list[str]:
    gpu = any(c.peak_device_mb is not None for c in results.cells)
    lines = ["## Seconds per update, split", "",
             "rollout: the denoising loop; reward: VAE decode + JPEG (TRL decodes inside its sampling loop: that "
             "decode is timed and moved here); prepare: advantages (ctrl: its value baseline); update: the optimiser "
             "steps. The phases add up to at most the total (the rest is bookkeeping). Ratios are to TRL at the same "
             "K and B: time and memory above 1 cost more than TRL, samples/s above 1 is faster.", "",
             "| K | B | setting | s/update | rollout | reward | prepare | update | samples/s | peak RSS MB "
             + ("| peak GPU MB " if gpu else "") + "| time ÷ TRL | samples/s ÷ TRL | peak ÷ TRL | load |",
             "|---" * (14 + gpu) + "|"]
    for shape in shapes_of(results):
        trl = cell(results, TRL, shape)
        for c in (c for c in results.cells if (c.steps, c.batch_size) == shape):
            if c.error is not None:
                lines.append(f"| {shape[0]} | {shape[1]} | {c.label} | failed: {c.error} |")
                continue
            m = c.median
            memory = c.peak_device_mb if gpu else c.peak_rss_mb
            base = None if trl is None else (trl.peak_device_mb if gpu else trl.peak_rss_mb)
            lines.append(
                f"| {shape[0]} | {shape[1]} | {c.label} | {fmt(m['seconds'])} | "
                + " | ".join(fmt(m[f"seconds_{p}"]) for p in ("rollout", "reward", "prepare", "update"))
                + f" | {fmt(m['samples_per_s'], 1)} | {fmt(c.peak_rss_mb, 0)} | "
                + (f"{fmt(c.peak_device_mb, 0)} | " if gpu else "")
                + f"{fmt(ratio(m['seconds'], trl and trl.median['seconds']), 2)} | "
                f"{fmt(ratio(m['samples_per_s'], trl and trl.median['samples_per_s']), 2)} | "
                f"{fmt(ratio(memory, base), 2)} | {c.load_start[0]:.2f} |")
    return lines + [""]


def scaling(results) -> list[str]:
    shapes = shapes_of(results)
    lines = ["## Against steps and batch size", "", "Seconds per update (samples per second).", "",
             "| setting | " + " | ".join(f"K={k}, B={b}" for k, b in shapes) + " |", "|---" * (len(shapes) + 1) + "|"]
    for label in labels_of(results):
        row = [cell(results, label, shape) for shape in shapes]
        lines.append(f"| {label} | " + " | ".join(
            "failed" if c is None else f"{fmt(c.median['seconds'])} ({fmt(c.median['samples_per_s'], 1)})"
            for c in row) + " |")
    return lines + [""]


def kl_cost(results) -> list[str]:
    cfg = results.config
    if not cfg.kl_algorithms:
        return []
    lines = [f"## What the KL term costs (beta_KL = {cfg.beta_kl:g} against 0)", "",
             "| algorithm | K | B | s/update at 0 | with KL | extra s | extra | rollout at 0 | with KL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for algo in cfg.kl_algorithms:
        for shape in shapes_of(results):
            a, b = cell(results, algo, shape), cell(results, f"{algo} + KL {cfg.beta_kl:g}", shape)
            if a is not None and b is not None:
                extra = b.median["seconds"] - a.median["seconds"]
                lines.append(f"| {algo} | {shape[0]} | {shape[1]} | {fmt(a.median['seconds'])} | "
                             f"{fmt(b.median['seconds'])} | {extra:+.3f} | {100 * extra / a.median['seconds']:+.0f}% | "
                             f"{fmt(a.median['seconds_rollout'])} | {fmt(b.median['seconds_rollout'])} |")
    return lines + [""]


def profile(results, shape) -> list[str]:
    lines = [f"## Where the time and memory go (K={shape[0]}, B={shape[1]})", "",
             "Per update: UNet calls and rows (a row is one latent; guidance doubles them) without gradients "
             "(rollouts) and with them (updates), and their forward seconds; backward + optimiser = update - grad "
             "forward; VAE rows decoded. Memory: the process's peak resident set after the imports, after building "
             "the trainer (pipeline, LoRA, optimiser), and at the end.", "",
             "| setting | UNet calls / rows, no grad | fwd s | UNet calls / rows, grad | fwd s "
             "| backward + optimiser s | VAE rows | VAE s | RSS imports MB | RSS setup MB | peak RSS MB |",
             "|---" * 11 + "|"]
    for label in labels_of(results):
        c = cell(results, label, shape)
        if c is not None:
            m = c.median
            lines.append(f"| {label} | {m['unet_nograd_calls']:.0f} / {m['unet_nograd_rows']:.0f} | "
                         f"{fmt(m['unet_nograd_seconds'])} | {m['unet_grad_calls']:.0f} / {m['unet_grad_rows']:.0f} | "
                         f"{fmt(m['unet_grad_seconds'])} | {fmt(m['seconds_update'] - m['unet_grad_seconds'])} | "
                         f"{m['vae_rows']:.0f} | {fmt(m['vae_seconds'])} | {fmt(c.rss_import_mb, 0)} | "
                         f"{fmt(c.rss_setup_mb, 0)} | {fmt(c.peak_rss_mb, 0)} |")
    return lines + [""]


def x_of(a: float | None, b: float | None) -> str:
    return f"{fmt(ratio(a, b), 2)}x"


def explain(results, shape) -> list[str]:
    """Sentences computed from the profile at one (K, B): why the ratios are what they are."""
    cfg, (K, B) = results.config, shape
    ours, trl, ctrl, kl, matched = (cell(results, label, shape) for label in
                                    ("ddpo", TRL, "ctrl", f"ddpo + KL {cfg.beta_kl:g}", "ddpo" + MATCHED))
    lines = ["## What explains the ratios", ""]
    if ours is None or trl is None:
        return lines + ["TRL's side was not measured: no ratios to explain.", ""]
    o, t = ours.median, trl.median
    rows = ratio(o["unet_nograd_rows"], t["unet_nograd_rows"])
    per_row = [1e3 * (ratio(m["unet_nograd_seconds"], m["unet_nograd_rows"]) or math.nan) for m in (o, t)]
    lines.append(
        f"- **Overall** (ddpo at beta_KL = 0 against TRL, K={K}, B={B}): {fmt(o['seconds'])} s against "
        f"{fmt(t['seconds'])} s per update ({x_of(o['seconds'], t['seconds'])}); rollout "
        f"{x_of(o['seconds_rollout'], t['seconds_rollout'])}, reward {x_of(o['seconds_reward'], t['seconds_reward'])},"
        f" update {x_of(o['seconds_update'], t['seconds_update'])}.")
    lines.append(
        f"- **Rollouts**: scoreaction runs the UNet on {o['unet_nograd_rows']:.0f} rows per update against TRL's "
        f"{t['unet_nograd_rows']:.0f} ({fmt(rows, 2)}x" + (
            ": the frozen reference is evaluated in a second pass at every step even at beta_KL = 0)" if rows and
            rows > 1.05 else ": K steps of 2B rows each, no reference pass at beta_KL = 0)")
        + f"; a row costs {fmt(per_row[0], 2)} ms of forward against {fmt(per_row[1], 2)} ms. Outside the UNet the "
        f"rollout spends {fmt(o['seconds_rollout'] - o['unet_nograd_seconds'])} s per update (Gaussian transitions, "
        f"log-probs, Tweedie estimates kept per step) against TRL's "
        f"{fmt(t['seconds_rollout'] - t['unet_nograd_seconds'])} s (its DDIM step and log-prob).")
    if kl is not None:
        k = kl.median
        lines.append(
            f"- **The KL term** (beta_KL = {cfg.beta_kl:g}): the reference (the same UNet with its LoRA adapters "
            f"disabled) runs in a second pass at every step: {k['unet_nograd_rows']:.0f} rows instead of "
            f"{o['unet_nograd_rows']:.0f}, rollout {fmt(k['seconds_rollout'])} s instead of "
            f"{fmt(o['seconds_rollout'])} s, {fmt(k['seconds'])} s per update instead of {fmt(o['seconds'])} s. Its "
            "scores are cached in the trajectory, so the updates never run the reference.")
    lines.append(
        f"- **Updates**: the same {o['unet_grad_rows']:.0f} UNet rows with gradients per update on both sides "
        f"({t['unet_grad_rows']:.0f} for TRL), but scoreaction in {o['unet_grad_calls']:.0f} calls of "
        f"{o['unet_grad_rows'] / max(o['unet_grad_calls'], 1):.0f} rows (random transitions across steps) and TRL in "
        f"{t['unet_grad_calls']:.0f} calls of {t['unet_grad_rows'] / max(t['unet_grad_calls'], 1):.0f} (one timestep "
        f"of a minibatch each): {fmt(o['seconds_update'])} s against {fmt(t['seconds_update'])} s "
        f"({x_of(o['seconds_update'], t['seconds_update'])}), of which grad-mode forward {fmt(o['unet_grad_seconds'])}"
        f" s against {fmt(t['unet_grad_seconds'])} s.")
    if matched is not None:
        m = matched.median
        lines.append(
            f"- **Call size**: with TRL's backward size ({m['unet_grad_calls']:.0f} calls of "
            f"{m['unet_grad_rows'] / max(m['unet_grad_calls'], 1):.0f} rows), ddpo's update takes "
            f"{fmt(m['seconds_update'])} s ({x_of(m['seconds_update'], t['seconds_update'])} TRL's; grad-mode forward "
            f"{fmt(m['unet_grad_seconds'])} s against {fmt(t['unet_grad_seconds'])} s, backward + optimiser "
            f"{fmt(m['seconds_update'] - m['unet_grad_seconds'])} s against "
            f"{fmt(t['seconds_update'] - t['unet_grad_seconds'])} s) and the whole update {fmt(m['seconds'])} s "
            f"({x_of(m['seconds'], t['seconds'])}). So the update ratio above comes from the number of calls: each "
            "carries a fixed cost (Python, autograd, peft's layers) that a few large calls amortise; where the work "
            "per row dominates (large UNets on a GPU) that matters less. Memory caps the call size: the peak RSS is "
            f"{fmt(matched.peak_rss_mb, 0)} MB with TRL's backward size against {fmt(ours.peak_rss_mb, 0)} MB with "
            f"the whole minibatch ({o['unet_grad_rows'] / max(o['unet_grad_calls'], 1):.0f} rows holding their "
            "activations at once); `micro_batch` bounds it without changing the update.")
    lines.append(
        f"- **Reward**: {fmt(o['seconds_reward'])} s against {fmt(t['seconds_reward'])} s, both decoding {B} latents "
        f"(ours {fmt(o['vae_seconds'])} s in the VAE, TRL {fmt(t['vae_seconds'])} s) and JPEG-encoding the images "
        "with the same function.")
    if ctrl is not None:
        c = ctrl.median
        lines.append(
            f"- **ctrl's value baseline**: its prepare phase takes {fmt(c['seconds_prepare'])} s per update "
            f"({fmt(100 * c['seconds_prepare'] / c['seconds'], 0)}% of its {fmt(c['seconds'])} s): it decodes "
            f"{c['vae_rows'] - B:.0f} more VAE rows than ddpo ({K}·{B} Tweedie estimates x0_hat, one per state, scored "
            "by the reward for V = c_skip r(x0_hat) + c_out h) and fits the value head"
            + (f". Its rollout also runs the reference at beta_KL = 0 ({c['unet_nograd_rows']:.0f} UNet rows against "
               f"ddpo's {o['unet_nograd_rows']:.0f}): the baseline scores the pretrained model's x0_hat"
               if c["unet_nograd_rows"] > 1.05 * o["unet_nograd_rows"] else "") + ".")
    extra = sorted(set(trl.heavy_imports) - set(ours.heavy_imports))
    lines.append(
        f"- **Memory**: peak RSS {fmt(ours.peak_rss_mb, 0)} MB against {fmt(trl.peak_rss_mb, 0)} MB "
        f"({x_of(ours.peak_rss_mb, trl.peak_rss_mb)}), most of it the libraries: after the imports the processes hold "
        f"{fmt(ours.rss_import_mb, 0)} and {fmt(trl.rss_import_mb, 0)} MB"
        + (f" (TRL's trainer module also loads {', '.join(extra)})" if extra else "")
        + f"; building the trainer adds {fmt(ours.rss_setup_mb - ours.rss_import_mb, 0)} and "
        f"{fmt(trl.rss_setup_mb - trl.rss_import_mb, 0)} MB, the updates {fmt(ours.peak_rss_mb - ours.rss_setup_mb, 0)}"
        f" and {fmt(trl.peak_rss_mb - trl.rss_setup_mb, 0)} MB. Per step and sample scoreaction keeps the state, the "
        "noise and the Tweedie estimate (and the reference score with the KL term), TRL the state and its shuffled "
        "copies; at SD-1.5 scale a latent is 64 KB in fp32, so K=50, B=32 holds about 105 MB per kept latent.")
    if trl.peak_device_mb is not None and ours.peak_device_mb is not None:
        lines.append(f"- **GPU memory**: allocator peak {fmt(ours.peak_device_mb, 0)} MB against "
                     f"{fmt(trl.peak_device_mb, 0)} MB ({x_of(ours.peak_device_mb, trl.peak_device_mb)}).")
    return lines + [""]


def render_markdown(results) -> str:
    shape = max(shapes_of(results), key=lambda s: s[0] * s[1])
    return "\n".join(header(results) + settings(results) + per_update(results) + scaling(results)
                     + kl_cost(results) + profile(results, shape) + explain(results, shape))
