"""Online preference training: the pairs are refreshed from the policy while it trains.

Before step 1 and before every ``refresh_every_n_steps``-th step, refresh k:

    prompts   slots k*n .. k*n+n-1 of online_prompts (cycled; n = prompts_per_refresh); process r
              of P samples the slots with slot % P == r
    sample    candidates_per_prompt candidates per slot from the current policy (LoRA on), with
              `pairs.sampler.generate` (the sipo-pairs sampler); candidate c of slot g has the seed
              candidate_seed(seed, g, c); the final latents are kept (no decode-encode round trip:
              the decoded image is only scored)
    score     every reward of online_rewards (`Reward.score`: NaN or a wrong shape is one line)
    gather    the processes' candidates, in (slot, candidate) order: every process holds all
    pair      combined z-scores over the refresh's candidates, `pairs.make.make_pairs`
              (strategy, margin; equal images and ties dropped and counted)
    pool      the pairs join the pool; only the most recent pool_size are kept

Each optimizer step draws its pairs from the pool with a generator keyed by (seed, step): the
step's P x accumulation micro-batches take consecutive slices of one permutation, process r the
slices r, r+P, ..., so P processes with B pairs each see exactly the pairs of one process with
P x B. With offline_mix, a share of the steps (decided by (seed, step)) takes its batches from
train_data's pairs instead. The pool is part of every checkpoint (safetensors + JSON), and the
refreshes, seeds and draws are functions of the step: a resumed run continues bit-identically.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..data.batch import PairBatch
from ..utils.seeding import seeded_generator

POOL_TENSORS, POOL_JSON = "online_pool.safetensors", "online_pool.json"
POOL_FORMAT = "sipo-plugin online pool 1"
ORDER_KEY, MIX_KEY = 3, 4  # draw keys beside the loop's (0: VAE, 2: noise and timestep)
CLIP_FRAME_STRIDE = 4  # video candidates score the mean over every 4th frame (sipo-pairs score)


class OnlineError(ValueError):
    """An online run that cannot go on; the message is one line naming the setting to change."""


class PairPool:
    """The most recent ``capacity`` pairs: winner and loser latents [N, ...], prompts, margins
    (combined-score units) and pair ids (0, 1, 2, ... in the order pairs were made: a pair's noise
    and timestep draws are keyed by its id)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.chosen = self.rejected = None  # [N, ...] float32 on the CPU
        self.prompts: list[str] = []
        self.margins = torch.zeros(0, dtype=torch.float64)
        self.pair_ids = torch.zeros(0, dtype=torch.int64)
        self.next_id = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def add(self, chosen: torch.Tensor, rejected: torch.Tensor, prompts: list[str],
            margins: torch.Tensor) -> None:
        """Append pairs (oldest first) and drop the oldest beyond ``capacity``."""
        count = len(prompts)
        if count == 0:
            return
        ids = torch.arange(self.next_id, self.next_id + count, dtype=torch.int64)
        self.next_id += count
        keep = slice(-self.capacity, None)
        self.chosen = _append(self.chosen, chosen.float().cpu())[keep]
        self.rejected = _append(self.rejected, rejected.float().cpu())[keep]
        self.margins = _append(self.margins, margins.to(torch.float64).cpu())[keep]
        self.pair_ids = _append(self.pair_ids, ids)[keep]
        self.prompts = (self.prompts + list(prompts))[keep]

    def batch(self, positions: list[int]) -> PairBatch:
        """The pairs at ``positions``: latents [2B, ...] (winners first), prompts [B], weights [B]
        (ones), indices [B] (pair ids)."""
        index = torch.tensor(positions, dtype=torch.int64)
        return PairBatch(latents=torch.cat([self.chosen[index], self.rejected[index]]),
                         prompts=[self.prompts[i] for i in positions],
                         weights=torch.ones(len(positions), dtype=torch.float32),
                         indices=self.pair_ids[index])

    def save(self, folder: Path) -> None:
        """Into a checkpoint folder being written: tensors in safetensors, the rest in JSON."""
        tensors = {"margins": self.margins, "pair_ids": self.pair_ids}
        if self.chosen is not None:
            tensors.update(chosen=self.chosen.contiguous(), rejected=self.rejected.contiguous())
        save_file(tensors, str(Path(folder) / POOL_TENSORS))
        info = {"format": POOL_FORMAT, "capacity": self.capacity, "next_id": self.next_id,
                "prompts": self.prompts}
        (Path(folder) / POOL_JSON).write_text(json.dumps(info) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path, capacity: int) -> "PairPool":
        """The pool of a checkpoint folder; OnlineError when it has none (an offline checkpoint)."""
        folder = Path(folder)
        try:
            info = json.loads((folder / POOL_JSON).read_text(encoding="utf-8"))
            tensors = load_file(str(folder / POOL_TENSORS))
        except (OSError, ValueError) as err:
            raise OnlineError(f"{folder}: no readable online pool ({type(err).__name__}); resume "
                              "an online run's checkpoint, or start without resume") from None
        if info.get("format") != POOL_FORMAT or info.get("capacity") != capacity:
            raise OnlineError(f"{folder / POOL_JSON}: a pool of another format or pool_size "
                              f"({info.get('capacity')}, now {capacity}); resume with the "
                              "checkpoint's settings")
        pool = cls(capacity)
        pool.chosen, pool.rejected = tensors.get("chosen"), tensors.get("rejected")
        pool.margins, pool.pair_ids = tensors["margins"], tensors["pair_ids"]
        pool.prompts, pool.next_id = list(info["prompts"]), int(info["next_id"])
        return pool


def _append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new])


# ---------------------------------------------------------------------------------------------
# One refresh: sample -> score -> gather -> pair


@dataclass
class Candidates:
    """Candidates of one refresh, one row each: slot [N] (global prompt slot), candidate [N],
    latents [N, ...], scores [N, R] (raw, one column per reward), identity [N] (image content)."""

    slot: torch.Tensor
    candidate: torch.Tensor
    latents: torch.Tensor
    scores: torch.Tensor
    identity: torch.Tensor

    def fields(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def content_id(frames) -> int:
    """A sample's image content as an int64 (equal images are one candidate: make_pairs drops
    the second)."""
    digest = hashlib.sha256()
    for frame in frames:
        digest.update(frame.tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def score_samples(rewards, samples, prompts: list[str]) -> torch.Tensor:
    """[N, R] raw scores: images scored as `sipo-pairs score` does, clips by their frames' mean."""
    columns = []
    for reward in rewards:
        if len(samples[0].frames) > 1:
            columns.append(reward.score_clips([s.frames for s in samples], prompts,
                                              CLIP_FRAME_STRIDE))
        else:
            columns.append(reward.score([s.frames[0] for s in samples], prompts))
    return torch.stack(columns, dim=1).to(torch.float64)


def gather_candidates(candidates: Candidates, accelerator) -> Candidates:
    """Every process's candidates on every process, in (slot, candidate) order (the same pairs
    whatever the process count). Tensors only: accelerate pads each process's rows to the most
    any process has, gathers, and the padding (slot -1) is dropped."""
    rows = candidates.fields()
    if accelerator is not None and accelerator.num_processes > 1:
        rows = {name: accelerator.gather(accelerator.pad_across_processes(
            value.to(accelerator.device), dim=0, pad_index=-1)).cpu() for name, value in rows.items()}
        kept = rows["slot"] >= 0
        rows = {name: value[kept] for name, value in rows.items()}
    order = torch.argsort(rows["slot"] * 1_000_003 + rows["candidate"])
    return Candidates(**{name: value[order] for name, value in rows.items()})


@dataclass
class RefreshReport:
    """What refresh ``index`` made and what it cost (seconds, this process)."""

    index: int
    step: int
    candidates: int
    pairs: int
    summary: str
    sample_s: float
    score_s: float


class OnlineSource:
    """The online part of a run: the pool, the refreshes, and the batches of each step."""

    def __init__(self, config, adapter, accelerator, log, pool: PairPool, rewards, prompts):
        from ..pairs.sample import settings_from
        self.config, self.adapter, self.accelerator, self.log = config, adapter, accelerator, log
        self.pool, self.rewards, self.prompts = pool, rewards, prompts
        settings = settings_from(config.model.family, config.sampling)
        self.settings = training_size(settings, config.data)
        self.bar = None  # the loop's progress bar: each refresh shows its costs in its title
        self.last_refresh_at = None
        self.history: list[RefreshReport] = []
        self.offline_steps = 0  # steps (of this session) trained on train_data's pairs

    @classmethod
    def start(cls, config, adapter, accelerator, log, resume_from: Path | None, start: int):
        """Rewards and prompts loaded; the pool restored from the checkpoint, or made by refresh 0
        from the starting policy (before calibration, which needs pairs)."""
        from ..pairs.prompts import read_prompts
        from ..rewards import build_reward
        o = config.online
        prompts = read_prompts(o.online_prompts)
        rewards = [build_reward(spec, device=adapter.device) for spec in o.online_rewards]
        pool = PairPool.load(resume_from, o.pool_size) if resume_from else PairPool(o.pool_size)
        if o.prompts_per_refresh < accelerator.num_processes:
            raise OnlineError(f"prompts_per_refresh = {o.prompts_per_refresh} is fewer than the "
                              f"{accelerator.num_processes} processes: give each at least one")
        source = cls(config, adapter, accelerator, log, pool, rewards, prompts)
        if resume_from is None:
            source.refresh(0, start)
        return source

    def sample(self, index: int) -> tuple[Candidates, float, float]:
        """This process's share of refresh ``index`` (at least one slot: `start` checks it) and
        the seconds spent sampling and scoring."""
        from ..pairs.sampler import candidate_seed, configure_pipeline, generate
        o, t = self.config.online, self.config.training
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        first = index * o.prompts_per_refresh
        slots = [first + i for i in range(o.prompts_per_refresh) if (first + i) % processes == rank]
        jobs = [(g, c) for g in slots for c in range(o.candidates_per_prompt)]
        entry = [self.prompts[g % len(self.prompts)] for g, _ in jobs]
        started = time.perf_counter()
        samples = []
        with self.adapter.encoders_on_device():
            pipe = configure_pipeline(self.adapter, self.settings)
            size = self.config.sampling.sample_batch_size
            for at in range(0, len(jobs), size):
                part = range(at, min(at + size, len(jobs)))
                samples += generate(pipe, self.adapter, self.settings,
                                     [entry[i].prompt for i in part],
                                     [candidate_seed(t.seed, *jobs[i]) for i in part],
                                     [entry[i].negative_prompt for i in part])
        sampled = time.perf_counter()
        scores = score_samples(self.rewards, samples, [e.prompt for e in entry])
        mine = Candidates(slot=torch.tensor([g for g, _ in jobs], dtype=torch.int64),
                          candidate=torch.tensor([c for _, c in jobs], dtype=torch.int64),
                          latents=torch.stack([s.latents for s in samples]), scores=scores,
                          identity=torch.tensor([content_id(s.frames) for s in samples],
                                                dtype=torch.int64))
        return mine, sampled - started, time.perf_counter() - sampled

    def refresh(self, index: int, step: int) -> RefreshReport:
        """Refresh ``index`` before step ``step`` (0-based): new pairs from the current policy into
        the pool. A refresh without a pair is skipped with a note (the pool is kept); the first
        one must make at least a batch of pairs."""
        from ..pairs.candidates import Candidate, candidate_id
        from ..pairs.make import make_pairs
        from ..rewards import combine_scores
        o = self.config.online
        trained_s = (time.perf_counter() - self.last_refresh_at
                     if self.last_refresh_at is not None else None)
        mine, sample_s, score_s = self.sample(index)
        started = time.perf_counter()
        rows = gather_candidates(mine, self.accelerator)
        combined = combine_scores({reward.name: rows.scores[:, r]
                                   for r, reward in enumerate(self.rewards)})
        records = [Candidate(id=candidate_id(g, c), prompt=self.prompts[g % len(self.prompts)].prompt,
                             prompt_index=g, candidate_index=c, seed=0, path="")
                   for g, c in zip(rows.slot.tolist(), rows.candidate.tolist())]
        pairs, counts = make_pairs(records, combined.tolist(), [str(i) for i in rows.identity.tolist()],
                                   strategy=o.online_pair_strategy, min_margin=o.online_min_margin)
        row_of = {record.id: i for i, record in enumerate(records)}
        winners = [row_of[p.chosen.id] for p in pairs]
        losers = [row_of[p.rejected.id] for p in pairs]
        if pairs:
            self.pool.add(rows.latents[winners], rows.latents[losers],
                          [p.chosen.prompt for p in pairs],
                          torch.tensor([p.margin for p in pairs], dtype=torch.float64))
        score_s += time.perf_counter() - started
        report = RefreshReport(index, step, len(records), len(pairs), counts.summary(), sample_s,
                               score_s)
        self.record(report, trained_s, len(self.pool))
        if len(self.pool) < self.config.training.train_batch_size:
            raise OnlineError(
                f"online refresh {index} left {len(self.pool)} pairs in the pool, fewer than "
                f"train_batch_size = {self.config.training.train_batch_size} ({counts.summary()}); "
                "raise prompts_per_refresh or candidates_per_prompt, or check that "
                "online_rewards tell the candidates apart")
        self.last_refresh_at = time.perf_counter()
        return report

    def record(self, report: RefreshReport, trained_s: float | None, pool: int) -> None:
        """The refresh's costs: a metrics.jsonl event, a line, and the progress bar's title."""
        self.history.append(report)
        costs = {"sample_s": round(report.sample_s, 3), "score_s": round(report.score_s, 3),
                 "train_s": None if trained_s is None else round(trained_s, 3)}
        self.log.event("online_refresh", step=report.step, refresh=report.index,
                       candidates=report.candidates, pairs=report.pairs, pool=pool, **costs)
        if report.pairs == 0:
            self.log.info(f"online refresh {report.index} before step {report.step + 1}: no pair "
                          f"({report.summary}); skipped, training continues on the pool's "
                          f"{pool} pairs")
        trained = "" if trained_s is None else f" train {trained_s:.1f}s"
        if self.bar is not None and not self.bar.disable:  # (a disabled bar: other processes)
            self.bar.set_description(f"{self.bar.desc.split(' [')[0]} [sample {report.sample_s:.1f}s "
                                     f"score {report.score_s:.1f}s{trained}]", refresh=False)

    def finish(self) -> None:
        """The training time since the last refresh (the run's last interval), and a summary."""
        if self.last_refresh_at is not None:
            self.log.event("online_train", offline_steps=self.offline_steps,
                           train_s=round(time.perf_counter() - self.last_refresh_at, 3))
        self.log.info(f"online: {costs_summary(self.history)}; the pool holds {len(self.pool)} pairs")

    # -- batches ----------------------------------------------------------------------------

    def batches(self, start: int, offline=None):
        """This process's micro-batches of steps ``start`` .. max_train_steps, refreshing the
        pool before every refresh_every_n_steps-th step (refresh 0 ran in `start`). ``offline``:
        the offline pairs' DataLoader over the same micro-batch stream (offline_mix)."""
        t, o = self.config.training, self.config.online
        micro, processes = t.gradient_accumulation_steps, self.accelerator.num_processes
        rank, per_step = self.accelerator.process_index, micro * processes
        device = self.accelerator.device
        offline_order = iter(offline.batch_sampler) if offline is not None else None
        for step in range(start, t.max_train_steps):
            if step % o.refresh_every_n_steps == 0 and step > 0:
                self.refresh(step // o.refresh_every_n_steps, step)
            offline_indices = ([next(offline_order) for _ in range(per_step)]
                               if offline_order is not None else None)
            if offline_indices is not None and self.offline_step(step):
                self.offline_steps += 1
                for m in range(micro):
                    chosen = offline_indices[m * processes + rank]
                    yield offline.collate_fn([offline.dataset[key] for key in chosen]).to(device)
                continue
            order = pool_order(len(self.pool), per_step * t.train_batch_size, t.seed, step)
            for m in range(micro):
                j, b = m * processes + rank, t.train_batch_size
                yield self.pool.batch(order[j * b:(j + 1) * b]).to(device)
        self.finish()

    def offline_step(self, step: int) -> bool:
        """Whether step ``step`` trains on the offline pairs: u < offline_mix, u ~ U(0, 1) keyed by
        (seed, step)."""
        u = torch.rand(1, generator=seeded_generator(self.config.training.seed, step, MIX_KEY))
        return bool(u.item() < self.config.online.offline_mix)

    def calibration_batches(self) -> list[dict]:
        """The pool's first calibration_pairs pairs in batches of train_batch_size (kappa = 'auto'
        is calibrated on the pairs of refresh 0)."""
        t = self.config.training
        count = min(t.calibration_pairs, len(self.pool))
        return [self.pool.batch(list(range(at, min(at + t.train_batch_size, count))))
                for at in range(0, count, t.train_batch_size)]


def pool_order(pool_pairs: int, needed: int, seed: int, step: int) -> list[int]:
    """``needed`` pool positions for step ``step``: a permutation of the pool keyed by (seed,
    step), repeated (each time a new one from the same stream) when the pool holds fewer."""
    generator = seeded_generator(seed, step, ORDER_KEY)
    rounds = math.ceil(needed / pool_pairs)
    order = torch.cat([torch.randperm(pool_pairs, generator=generator) for _ in range(rounds)])
    return order[:needed].tolist()


def training_size(settings, data):
    """Candidates are sampled at the run's training size unless [sampling] sets one."""
    import dataclasses
    if data.num_frames:
        return dataclasses.replace(settings, width=settings.width or data.video_width,
                                   height=settings.height or data.video_height,
                                   num_frames=settings.num_frames or data.num_frames)
    return dataclasses.replace(settings, width=settings.width or data.resolution,
                               height=settings.height or data.resolution)


def costs_summary(history: list[RefreshReport]) -> str:
    """One line: refreshes, pairs made, seconds sampling and scoring in total."""
    return (f"{len(history)} refreshes, {sum(r.pairs for r in history)} pairs, sampling "
            f"{sum(r.sample_s for r in history):.1f} s, scoring {sum(r.score_s for r in history):.1f} s")



def calibration_needed(config) -> bool:
    """Whether the configured objective calibrates kappa = 'auto' (then on refresh 0's pairs)."""
    from ..objectives import get_objective
    return get_objective(config.objective.name, **config.objective.hyperparameters).needs_calibration
