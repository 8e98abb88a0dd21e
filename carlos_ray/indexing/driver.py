"""The driver of an indexing run: skip what is done, run the base pass, stream the LoRA pass, commit, retry.

    sources ─▶ collect_sources (header, hash, compatibility) ─▶ rejects
    plan.rows (lora_id, prompt, seed), LoRA-major
      ─▶ GenerateImages ─▶ EmbedDiff (map-side PartialStats)
      ─▶ LoraPass: merge partials per LoRA ─▶ finalize ─▶ atomic commit to the index

A LoRA is committed only when all its samples are in, so a killed job loses at most the LoRAs in flight and a
re-run skips everything already indexed under the same configuration hash.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from carlos_ray.adaptive import AdaptiveRounds, Carry, partials_table
from carlos_ray.config import Config
from carlos_ray.indexing.plan import IndexPlan, base_array, diffs_table, signature_row, signatures_table
from carlos_ray.indexing.quarantine import WORKER_CRASHED, start_registry
from carlos_ray.indexing.sources import LoraJob, collect_sources, reject_record
from carlos_ray.indexing.stages import data_context, generate_and_embed
from carlos_ray.runtime import ensure_ray
from carlos_ray.signatures import PartialStats
from carlos_ray.store import Index, Snapshot, rejects_table
from carlos_ray.thresholds import Thresholds, resolve_thresholds
from carlos_ray.uncertainty import standard_errors

logger = logging.getLogger(__name__)

COMPACT_AFTER_PARTS = 64


@dataclass
class IndexSummary:
    indexed: int = 0
    skipped: int = 0
    rejected: int = 0
    duplicates: int = 0
    images_generated: int = 0
    rounds: int = 0  # LoRA passes run (adaptive sampling: one per round of a wave; else 1)
    pass_retries: int = 0
    duplicate_outputs: int = 0
    base_cached: bool = False
    wall_seconds: float = 0.0
    inspect_seconds: float = 0.0
    base_seconds: float = 0.0
    lora_pass_seconds: float = 0.0
    generate_busy_seconds: float = 0.0
    embed_busy_seconds: float = 0.0
    index: str = ""
    rejects: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class IncompletePass(RuntimeError):
    """The LoRA pass ended while some LoRAs still missed samples (nothing of them was committed)."""


def is_system_failure(e: BaseException) -> bool:
    """A Ray failure of the cluster rather than of our code (node or actor lost, object lost): worth a re-run."""
    from ray.exceptions import RayError, RayTaskError

    if isinstance(e, IncompletePass):
        return True
    if isinstance(e, RayTaskError):  # an exception raised inside a task: system only if caused by another Ray failure
        return isinstance(e.cause, RayError) and is_system_failure(e.cause)
    return isinstance(e, RayError)


def retry_passes(run_pass: Callable[[list[LoraJob], set[str]], None], todo: list[LoraJob], pass_retries: int,
                 summary: IndexSummary, sleep: Callable[[float], None] = time.sleep) -> None:
    """Run `run_pass(remaining, finished)`; after a system failure, run it again for the LoRAs not finished.

    Ray restarts dead actors and retries their tasks (`resources.max_restarts`, `max_task_retries`); when that is
    not enough (a node lost with a task in flight), the whole pass fails. Every finished LoRA was already
    committed (the pass adds its id to `finished`), so a re-run over the rest loses and duplicates nothing.
    Retries stop after `pass_retries` failures in a row with no LoRA finished, so a cluster that cannot make
    progress fails the job instead of looping; an application error is never retried."""
    remaining = list(todo)
    stalled = 0
    while True:
        finished: set[str] = set()
        try:
            run_pass(remaining, finished)
            return
        except Exception as e:
            if not is_system_failure(e):
                raise
            remaining = [j for j in remaining if j.lora_id not in finished]
            stalled = 0 if finished else stalled + 1
            if stalled > pass_retries:
                raise RuntimeError(f"the LoRA pass failed {stalled} times in a row without finishing a LoRA "
                                   f"({len(remaining)} LoRAs left; re-run to resume): {type(e).__name__}: {e}") from e
            summary.pass_retries += 1
            logger.warning("the LoRA pass failed (%s: %s); %d LoRAs committed before it, re-running the pass for "
                           "the %d left (retry %d)", type(e).__name__, str(e)[:300], len(finished), len(remaining),
                           summary.pass_retries)
            sleep(min(2.0 ** stalled, 10.0))


class LoraPass:
    """One streaming pass over some LoRAs: merges the map-side partials of each, finishes a LoRA (signature or
    reject) once all its samples are in, and commits finished LoRAs every `commit_every`.

    With `rounds` (adaptive sampling) a LoRA's samples in this pass are its next round; once they are in, its
    merged statistics either settle (signature, with its standard errors) or go to the `partials` table, in the
    same commit as any signature, and the LoRA runs again in the next pass."""

    def __init__(self, driver: "IndexDriver", todo: list[LoraJob], finished_ids: set[str],
                 rounds: AdaptiveRounds | None = None):
        self.driver, self.plan, self.index, self.summary = driver, driver.plan, driver.index, driver.summary
        self.rounds = rounds
        self.samples = {j.lora_id: None if rounds is None else rounds.next_samples(j.lora_id) for j in todo}
        n_all = self.plan.samples_per_lora
        self.expected = {lid: n_all if s is None else len(s) for lid, s in self.samples.items()}
        self.carries: dict[str, Carry | None] = {}  # adaptive: the carry each pending LoRA leaves (None: it stopped)
        self.todo = todo
        self.by_id = {j.lora_id: j for j in todo}
        self.finished_ids = finished_ids
        self.acc: dict[str, PartialStats] = {}
        self.covered: dict[str, set[int]] = defaultdict(set)  # prompt_idx << 32 | seed_idx of every sample received
        self.nonfinite: dict[str, int] = defaultdict(int)
        self.errors: dict[str, str] = {}
        self.extra: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.pending: dict[str, list] = {"signatures": [], "rejects": [], "diffs": [], "thumbs": [], "partials": []}
        self.pending_ids: list[str] = []
        self.finished = 0

    def run(self, base: np.ndarray, registry: Any = None) -> None:
        import ray.data

        cfg = self.plan.cfg
        data_context(cfg)
        rows = [r for job in self.todo for r in self.plan.rows([job], self.samples[job.lora_id])]
        per_lora = max(1, len(rows) // max(len(self.todo), 1))
        blocks = max(1, len(rows) // (cfg.indexing.lora_block_rows or per_lora))
        ds = generate_and_embed(ray.data.from_items(rows, override_num_blocks=blocks), self.plan, base=base,
                                registry=registry)
        try:
            for row in ds.iter_rows():
                if self.receive(row) and len(self.covered[row["lora_id"]]) == self.expected[row["lora_id"]]:
                    self.finished += 1
                    self.finish(row["lora_id"])
                    if self.finished % self.driver.commit_every == 0:
                        self.flush()
        finally:  # every finished LoRA is complete: commit it even when the pass fails
            self.flush()
        incomplete = [self.by_id[k].name for k in self.covered if len(self.covered[k]) < self.expected[k]]
        if incomplete:
            raise IncompletePass(f"the pipeline ended with incomplete LoRAs {incomplete}: nothing of them was committed")

    def receive(self, row: dict) -> bool:
        """Merge one map-side partial; False for a repeated output (a retried task delivered twice)."""
        lid = row["lora_id"]
        keys = set(row["sample_keys"])
        if keys & self.covered[lid]:
            if keys <= self.covered[lid]:
                self.summary.duplicate_outputs += 1
                logger.warning("ignored a repeated output for LoRA %s (%d samples already merged)", lid, len(keys))
                return False
            raise RuntimeError(f"LoRA {lid}: a pipeline output overlaps samples already merged but is not a repeat; "
                               "the index is unchanged for it")
        self.covered[lid] |= keys
        part = PartialStats.from_row(row)
        self.acc[lid] = self.acc[lid].merge(part) if lid in self.acc else part
        self.nonfinite[lid] += int(row["n_nonfinite"])
        self.summary.generate_busy_seconds += float(row.get("gen_seconds") or 0.0)
        self.summary.embed_busy_seconds += float(row.get("embed_seconds") or 0.0)
        if row["error"]:
            self.errors.setdefault(lid, row["error"])
        for k in ("diff_prompt_idx", "diff_seed_idx", "diffs", "thumb_prompt_idx", "thumbs"):
            if k in row and row[k] is not None:
                self.extra[lid][k].extend(list(row[k]))
        return True

    def rejection(self, lid: str, carry: Carry, n_taken: int, last: bool) -> tuple[str, str] | None:
        """(code, reason) when a LoRA whose samples of this pass are in must be rejected, else None."""
        cfg = self.plan.cfg
        error = self.errors.get(lid)
        if error is not None and error.startswith(WORKER_CRASHED + ":"):
            return WORKER_CRASHED, error.split(":", 1)[1].strip()
        if error is not None:
            return "load_failed", f"the adapter failed to load or run: {error}"
        if carry.n_nonfinite / n_taken > cfg.indexing.max_nonfinite_fraction:
            return "nonfinite_samples", (f"{carry.n_nonfinite} of {n_taken} images or embeddings were non-finite "
                                         f"(limit {cfg.indexing.max_nonfinite_fraction:.0%})")
        if carry.partial.count < 2 and last:
            return "too_few_samples", f"only {carry.partial.count} finite samples; a signature needs at least 2"
        return None

    def finish(self, lid: str) -> None:
        job, cfg, position, rounds = self.by_id[lid], self.plan.cfg, self.finished, self.rounds
        self.summary.images_generated += self.expected[lid]
        if rounds is None:
            carry, n_taken, last = Carry(1, self.acc[lid], self.nonfinite[lid]), self.plan.samples_per_lora, True
        else:
            carry = rounds.advance(lid, self.acc[lid], self.nonfinite[lid])
            n_taken, last = rounds.plan.used(carry.rounds_done), rounds.is_last(carry)
        total = carry.partial
        reject = self.rejection(lid, carry, n_taken, last)
        if reject:
            r = reject_record(job.path, *reject, sha256=job.sha256)
            self.pending["rejects"].append(r)
            self.summary.rejects.append(r)
            self.carries[lid] = None
            logger.info("[%d/%d] rejected %s: %s", position, len(self.todo), job.name, reject[1])
        else:
            # adaptive: consistency estimates the full protocol's (its pair mix), whatever prefix of it was sampled
            full_seeds = len(self.plan.seeds) if rounds is not None else None
            errs = standard_errors(total, self.plan.independent_seeds, full_seeds)
            if rounds is not None and not last and not rounds.rule.settled(errs, carry.rounds_done):
                self.pending["partials"].append(rounds.row(lid, carry))
                self.carries[lid] = carry
                logger.info("[%d/%d] %s: round %d, %d samples, direction rse %.3g, strength rse %.3g, consistency "
                            "se %.3g: not settled", position, len(self.todo), job.name, carry.rounds_done, total.count,
                            errs.direction_rse, errs.strength_rse, errs.consistency_se)
            else:
                sig = total.finalize(self.plan.categories, full_seeds)
                self.pending["signatures"].append(signature_row(job, sig, self.plan, errs, carry.rounds_done))
                self.carries[lid] = None
                self.summary.indexed += 1
                logger.info("[%d/%d] indexed %s  strength=%.4g±%.2g consistency=%.4g±%.2g n=%d", position,
                            len(self.todo), job.name, sig.strength, errs.strength_se, sig.consistency,
                            errs.consistency_se, sig.n)
                if self.driver.on_lora:
                    self.driver.on_lora({"lora_id": lid, "name": job.name, "strength": sig.strength,
                                         "consistency": sig.consistency, "strength_se": errs.strength_se,
                                         "consistency_se": errs.consistency_se, "n": sig.n,
                                         "n_rounds": carry.rounds_done})
            # a round's diffs and thumbnails are committed with the round's statistics
            if cfg.indexing.keep_diffs and self.extra[lid]["diffs"]:
                self.pending["diffs"].append(diffs_table(lid, self.extra[lid], total.d))
            if cfg.indexing.keep_thumbnails:
                for pi, png in zip(self.extra[lid]["thumb_prompt_idx"], self.extra[lid]["thumbs"]):
                    self.pending["thumbs"].append({"lora_id": lid, "prompt_idx": pi, "png": png})
        self.pending_ids.append(lid)
        del self.acc[lid], self.extra[lid]

    def flush(self) -> None:
        """Commit the finished LoRAs not committed yet (one manifest write)."""
        pending = self.pending
        if not any(pending.values()):
            return
        tables = {
            "signatures": signatures_table(pending["signatures"]) if pending["signatures"] else None,
            "rejects": rejects_table(pending["rejects"], self.plan.config_hash) if pending["rejects"] else None,
            "diffs": pa.concat_tables(pending["diffs"]) if pending["diffs"] else None,
            "thumbs": pa.Table.from_pylist(pending["thumbs"]) if pending["thumbs"] else None,
            "partials": partials_table(pending["partials"], self.plan.config_hash) if pending["partials"] else None,
        }
        m = self.index.commit(tables)
        logger.info("committed %d signatures, %d rejects, %d round statistics (index version %d)",
                    len(pending["signatures"]), len(pending["rejects"]), len(pending["partials"]), m.version)
        if self.rounds is not None:
            for lid, carry in self.carries.items():
                self.rounds.record(lid, carry)
            self.carries.clear()
        self.finished_ids.update(self.pending_ids)
        self.pending_ids.clear()
        for v in pending.values():
            v.clear()


class IndexDriver:
    """One indexing run of `cfg` into `index_uri`: resumable and exactly-once.

    A LoRA already indexed, or already rejected by an earlier run under the same configuration hash (bad
    samples, failed load, quarantine), is skipped; `retry_rejected` runs the rejected ones again."""

    def __init__(self, cfg: Config, index_uri: str, *, address: str | None = None, commit_every: int = 1,
                 max_loras: int | None = None, on_lora: Callable[[dict], None] | None = None,
                 retry_rejected: bool = False):
        self.plan = IndexPlan(cfg)
        self.index = Index(index_uri)
        self.summary = IndexSummary(index=str(index_uri))
        self.address, self.commit_every, self.max_loras = address, commit_every, max_loras
        self.on_lora, self.retry_rejected = on_lora, retry_rejected

    def run(self, sources: list[str]) -> IndexSummary:
        from carlos_ray.models.generator import generator_lora_targets

        t0 = time.time()
        plan, summary, index = self.plan, self.summary, self.index
        with index:
            index.init(plan.manifest_fields())
            aliases: list[dict] = []
            jobs, rejects, summary.duplicates = collect_sources(sources, generator_lora_targets(plan.cfg.generator),
                                                                aliases=aliases)
            summary.inspect_seconds = time.time() - t0
            snap = index.snapshot()  # one read serves the skip lists and the base-cache check below
            todo = self.select(jobs, rejects, snap, aliases)
            ensure_ray(self.address)
            had_base = plan.base_key in snap.manifest.base  # a rejects commit does not change the base cache
            t1 = time.time()
            base = self.base_pass(snap) if todo or not had_base else None
            summary.base_seconds = time.time() - t1
            summary.base_cached = had_base
            if not had_base:
                summary.images_generated += plan.samples_per_lora
            if todo:
                t2 = time.time()
                rounds = plan.adaptive_state(snap.table("partials"))
                if rounds is None:
                    self.lora_passes(todo, base)
                else:
                    self.adaptive_passes(todo, base, rounds)
                summary.lora_pass_seconds = time.time() - t2
            m = index.commit(fields={"thresholds": self.thresholds().as_manifest(), **plan.manifest_fields()})
            if m.counts.get("parts", 0) > COMPACT_AFTER_PARTS:
                index.compact()  # one part per table again; unreferenced files removed
        summary.rejected = len(summary.rejects)
        summary.wall_seconds = time.time() - t0
        return summary

    def select(self, jobs: list[LoraJob], rejects: list[dict], snap: Snapshot, aliases: list[dict] | None = None) -> list[LoraJob]:
        """The jobs to run (not indexed, not rejected before unless retried); commits the new inspection rejects
        and the new exact copies (``aliases``: other paths of files already seen, see :func:`collect_sources`)."""
        plan, summary = self.plan, self.summary
        done = snap.indexed_ids()
        rej = snap.rejects()
        rejected = set() if self.retry_rejected else {
            sha for sha, ch in zip(rej.column("sha256").to_pylist(), rej.column("config_hash").to_pylist())
            if sha and ch == plan.config_hash}
        todo = [j for j in jobs if j.lora_id not in done and j.sha256 not in rejected]
        summary.skipped = len(jobs) - len(todo)
        n_rejected_before = sum(j.sha256 in rejected for j in jobs)
        if n_rejected_before:
            logger.info("%d LoRAs were rejected by an earlier run and are skipped (retry_rejected / --retry-rejected "
                        "runs them again)", n_rejected_before)
        if self.max_loras is not None:
            todo = todo[: self.max_loras]
        known_rejects = set(rej.column("path").to_pylist())
        new_rejects = [r for r in rejects if r["path"] not in known_rejects]
        summary.rejects = list(rejects)
        known = snap.table("aliases", columns=["lora_id", "path"])
        known = set() if known is None else set(zip(known["lora_id"].to_pylist(), known["path"].to_pylist()))
        new_aliases = [a for a in aliases or [] if (a["lora_id"], a["path"]) not in known]
        if new_rejects or new_aliases:
            from carlos_ray.behavior.index import aliases_table

            self.index.commit({"rejects": rejects_table(new_rejects, plan.config_hash) if new_rejects else None,
                               "aliases": aliases_table(new_aliases) if new_aliases else None})
        logger.info("%d LoRAs usable (%d already indexed, %d duplicates), %d rejected",
                    len(jobs), summary.skipped, summary.duplicates, len(rejects))
        return todo

    def base_pass(self, snap: Snapshot) -> np.ndarray:
        """Base embeddings (n_prompts, n_seeds, d), from the index cache or computed on Ray Data and cached."""
        import ray
        import ray.data

        plan = self.plan
        cached = snap.base(plan.base_key)
        if cached is not None:
            logger.info("base images: cached (%d samples)", cached.num_rows)
            return base_array(cached, plan)
        logger.info("base pass: %d prompts x %d seeds", len(plan.prompts), len(plan.seeds))
        data_context(plan.cfg)
        ds = generate_and_embed(ray.data.from_items(plan.rows([None])), plan, base=None)
        table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        table = table.sort_by([("prompt_idx", "ascending"), ("seed_idx", "ascending")])
        if not all(table.column("finite").to_pylist()):
            bad = table.filter(pa.compute.invert(table.column("finite"))).num_rows
            raise RuntimeError(f"the base model produced {bad} non-finite images or embeddings; fix the generator "
                               "settings (e.g. keep the VAE in float32) before indexing")
        self.index.commit(base=(plan.base_key, table))
        return base_array(table, plan)

    def lora_passes(self, todo: list[LoraJob], base: np.ndarray, rounds: AdaptiveRounds | None = None) -> None:
        """One LoRA pass (adaptive: one round) with pass-level retries and the quarantine registry of this run."""
        import ray

        registry = start_registry(self.plan.cfg.resources.max_worker_crashes)  # quarantines LoRAs that crash their actor
        try:
            retry_passes(lambda remaining, finished: LoraPass(self, remaining, finished, rounds).run(base, registry),
                         todo, self.plan.cfg.resources.pass_retries, self.summary)
        finally:
            ray.kill(registry)
        self.summary.rounds += 1

    def adaptive_passes(self, todo: list[LoraJob], base: np.ndarray, rounds: AdaptiveRounds) -> None:
        """Waves of at most `max_in_flight` LoRAs (resumed ones first); in each, one pass per round over the LoRAs
        still running, until every LoRA of the wave settled, reached the full protocol or was rejected."""
        todo = sorted(todo, key=lambda j: j.lora_id not in rounds.carry)
        size = self.plan.cfg.sampling.adaptive.max_in_flight
        for start in range(0, len(todo), size):
            wave = todo[start : start + size]
            while wave:
                self.lora_passes(wave, base, rounds)
                wave = [j for j in wave if j.lora_id in rounds.running]

    def thresholds(self) -> Thresholds:
        """The manifest's default filters: the config's (paper: 9.8 / 0.041), else calibrated from the index."""
        cfg = self.plan.cfg.indexing
        stored = {"max_strength": cfg.max_strength, "min_consistency": cfg.min_consistency, "source": "config"}
        if cfg.max_strength is not None and cfg.min_consistency is not None:
            return resolve_thresholds(stored=stored)
        sig = self.index.snapshot().table("signatures", columns=["strength", "consistency"])
        enough = sig is not None and sig.num_rows >= 2
        data = (np.asarray(sig.column("strength")), np.asarray(sig.column("consistency"))) if enough else None
        return resolve_thresholds(stored=stored, calibrate_from=data)


def run_index(
    cfg: Config,
    sources: list[str],
    index_uri: str,
    *,
    address: str | None = None,
    commit_every: int = 1,
    max_loras: int | None = None,
    on_lora: Callable[[dict], None] | None = None,
    retry_rejected: bool = False,
) -> IndexSummary:
    """Index every LoRA in `sources` into `index_uri` (see :class:`IndexDriver`)."""
    return IndexDriver(cfg, index_uri, address=address, commit_every=commit_every, max_loras=max_loras,
                       on_lora=on_lora, retry_rejected=retry_rejected).run(sources)
