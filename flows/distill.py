"""Distillation: a teacher writes verified SFT rows while the student trains on the growing file; optionally
the student is then preference-trained on the teacher's right vs wrong replies (`preference:`)."""

from __future__ import annotations

from prefect import flow
from prefect.futures import wait

from mlxcore.config import BenchTarget, DistillConfig, TokenizerConfig, with_overrides
from flows.preference import align
from flows.export import ship
from tasks.bench import run_bench
from tasks.data import tokenizer
from tasks.report import reported
from tasks.distill import (check_teacher, compare, generate_rows, prompt_corpus, rows_dir, stop_generation, student_dir,
                           train_student)
from tasks.promotion import bench_outcomes, metric_of, promote
from tasks.record import record_run
from tasks.train import model_card, publish
from mlxcore.tracking import promotion


@flow(name="distill")
@reported
def distill(config: DistillConfig = DistillConfig(), overrides: list[str] = []) -> dict:
    """`overrides`: KEY=VALUE settings on top of `config`, e.g. ["target_rows=500", "teacher.workers=8"]."""
    config = with_overrides(config, overrides)
    run, student = str(config.run_dir), config.student
    health = check_teacher(config.teacher)
    if student.init_from:
        tok = tokenizer(TokenizerConfig(path=student.init_from), None, None, {}, {}, run)
    else:
        corpus = None if student.tokenizer.path else prompt_corpus(config.prompts, 20_000, run)
        tok = tokenizer(student.tokenizer, corpus, None, {}, {}, run)
    rows, out = str(rows_dir(config)), str(student_dir(config, tok["path"]))
    gen = generate_rows.submit(rows, config.teacher, config.prompts, config.verify, config.target_rows,
                               config.max_prompts)
    trained = train_student.submit(rows, tok["path"], student, config.train, config.stream, config.target_rows, out, run,
                                   teacher=config.teacher)
    try:
        wait([gen, trained])
    except BaseException:  # Ctrl-C / SIGTERM / cancel arrive here: stop the generator's thread too
        stop_generation(rows)
        raise
    generated, model = gen.result(), trained.result()  # a failed generator stops the student too
    final, aligned = model["checkpoint"], None
    if config.preference is not None:  # right vs wrong teacher replies: preference pairs with no human labels
        pairs = None
        if config.preference.data is None:
            if not generated.get("pairs_count"):
                raise RuntimeError(f"preference: the teacher was never verified wrong on a prompt it also answered "
                                   f"right, so {generated['pairs']} has no pairs; give preference.data files instead")
            pairs = {"train": [generated["pairs"]], "val": []}
        aligned = align(config.preference, model["checkpoint"], tok["path"], run, inputs=pairs)
        final = aligned["checkpoint"]
    samples = compare(final, rows, config.prompts, config.verify, config.stream, config.sample, run)
    promo = config.promotion
    if not promo.enabled:
        publish(final, run)
    shipped, exports = None, []
    if config.export is not None:
        shipped = ship(config.export, final, run, "student")
        exports = shipped.pop("targets")
    bench = None
    if config.bench is not None:  # the student (and its exports) beside its teacher (and the config's targets)
        t = config.teacher
        own = [BenchTarget(kind="checkpoint", path=final, name="student"), *exports,
               BenchTarget(kind=t.api, url=t.url, model=t.model, api_key_env=t.api_key_env,
                           api_key_secret=t.api_key_secret, workers=t.workers, timeout_s=t.timeout_s, name="teacher")]
        bench = run_bench(own, config.bench, run, title=f"bench {config.name}: student vs teacher")
    decision = None
    if promo.enabled:  # <run>/model moves to this student only if it beats the champion (an earlier run's)
        outcomes = (bench_outcomes(bench, "student") if metric_of(promo, bench is not None) == "bench"
                    else promotion.eval_outcomes(samples.get("per_prompt") or []))
        decision = promote(run, final, final, outcomes, promo, config.name)
    model_card(final, {"bench": bench, "student pass rate": samples["student_pass_rate"]}, run)
    record_run("distill", config, {"student": model["checkpoint"], "preference": aligned and aligned["train"]["checkpoint"]},
               final, bench, "student")
    return {"checkpoint": final, "rows": generated, "train": model, "teacher": health,
            "samples": samples, "bench": bench, "preference": aligned, "export": shipped, "promotion": decision}
