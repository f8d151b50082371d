"""What the trainer does to a host batch between the loader and the device, as one object.

The steps (each exact, see its own docstring): captions cut after the batch's longest first
EOT (`trim_captions`), region phrases cut the same way (`trim_region_text`), each distinct
phrase kept once (`PhraseDedup`), phrases and captions packed into rows of real tokens
(`text_packing.Packer`).

Why one object with a state:
- The shapes these steps produce only grow over a run (each keeps a floor: the longest
  caption and phrase lengths, the largest phrase and packed-row counts so far), so the
  jitted step compiles for a few shapes, not for every batch. Those floors are the state.
  The trainer saves it in each checkpoint's `meta["prep"]` and a resumed run starts from
  it, so the resumed run gives its step the same shapes, and the same programs, as an
  uninterrupted one.
- It runs in the loader's producer thread (`BatchIterator(prepare=...)`), which walks the
  steps in order, so the floors advance in step order and the host work (np.unique, row
  filling: ~10 ms for 4096 phrases) overlaps the device's step instead of delaying the next.

numpy only (no jax), like the rest of the input pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from clocmllm.encoder.input_pipeline import PhraseDedup, trim_captions, trim_region_text
from clocmllm.encoder.text_packing import Packer, wants_packing

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class PrepSettings:
    """Which steps run. The trainer derives them from its config (`from_config`)."""

    eot_token_id: int
    align: int = 1  # row counts are multiples of this (the device count): even sharding
    trim_captions: bool = False
    trim_phrases: bool = False
    dedup_phrases: bool = False
    pack_phrases: bool = False
    pack_captions: bool = False


class BatchPrep:
    """Callable host batch -> host batch, with the shape floors as `state_dict()`."""

    def __init__(self, settings: PrepSettings):
        s = self.settings = settings
        self.caption_len = 0
        self.phrase_len = 0
        self.dedup = PhraseDedup(align=s.align) if s.dedup_phrases else None
        self.phrase_packer = Packer("phrases", s.eot_token_id, align=s.align) if s.pack_phrases else None
        self.caption_packer = Packer("captions", s.eot_token_id, align=s.align) if s.pack_captions else None

    @classmethod
    def from_config(
        cls, cfg: Mapping, text_width: int, eot_token_id: int, devices: int, processes: int
    ) -> BatchPrep:
        """The steps the trainer runs for a resolved config.

        Every host's batch must have the same shape, so the data-dependent cuts run on a
        single process only. The rocket and LCL recipes read `text` (rocket `region_text`
        too) themselves: both get their batches as loaded.
        """
        single = processes == 1
        trim_phrases = cfg["mode"] == "cloc" and cfg["recipe"] != "lcl" and single
        own_phrases = trim_phrases and cfg["recipe"] == "cloc"
        trim_text = cfg["recipe"] == "cloc" and single
        return cls(
            PrepSettings(
                eot_token_id=eot_token_id,
                align=devices,
                trim_captions=trim_text,
                trim_phrases=trim_phrases,
                dedup_phrases=own_phrases and bool(cfg["data"]["dedup_phrases"]),
                pack_phrases=own_phrases and wants_packing(cfg["data"]["pack_phrases"], text_width),
                pack_captions=trim_text and wants_packing(cfg["data"]["pack_captions"], text_width),
            )
        )

    def __call__(self, batch: Batch) -> Batch:
        s = self.settings
        if s.trim_captions:
            batch = trim_captions(batch, s.eot_token_id, floor=self.caption_len)
            self.caption_len = batch["text"].shape[-1]
        if s.trim_phrases:
            batch = trim_region_text(batch, s.eot_token_id, floor=self.phrase_len)
            if "region_text" in batch:
                self.phrase_len = batch["region_text"].shape[-1]
        if self.dedup is not None:
            batch = self.dedup(batch)
        if self.phrase_packer is not None:
            batch = self.phrase_packer(batch)
        if self.caption_packer is not None:
            batch = self.caption_packer(batch)
        return batch

    def state_dict(self) -> dict:
        """The shape floors, JSON-serialisable (plain ints and bools)."""
        out: dict = {"caption_len": int(self.caption_len), "phrase_len": int(self.phrase_len)}
        if self.dedup is not None:
            out["dedup_rows"] = int(self.dedup.rows)
        for name, packer in (("phrase_pack", self.phrase_packer), ("caption_pack", self.caption_packer)):
            if packer is not None:
                out[name] = {"rows": int(packer.rows), "width": int(packer.width), "on": bool(packer.on)}
        return out

    def load_state_dict(self, state: Mapping | None) -> None:
        """Continue from `state_dict()`'s floors. None or {} (a checkpoint written before the
        floors were saved) starts from zero, as a new run does: still exact, the step may
        only compile for other shapes than the interrupted run's.

        Raises ValueError naming the field when a value is not a non-negative int (or bool)."""
        state = dict(state or {})

        def count(where: str, value) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"checkpoint meta prep.{where}: {value!r} is not a non-negative integer")
            return value

        self.caption_len = count("caption_len", state.get("caption_len", 0))
        self.phrase_len = count("phrase_len", state.get("phrase_len", 0))
        if self.dedup is not None:
            self.dedup.rows = count("dedup_rows", state.get("dedup_rows", 0))
        for name, packer in (("phrase_pack", self.phrase_packer), ("caption_pack", self.caption_packer)):
            saved = state.get(name)
            if packer is None or not saved:
                continue
            if not isinstance(saved, Mapping):
                raise ValueError(f"checkpoint meta prep.{name}: {saved!r} is not a mapping")
            packer.rows = count(f"{name}.rows", saved.get("rows", 0))
            packer.width = count(f"{name}.width", saved.get("width", packer.width))
            on = saved.get("on", packer.on)
            if not isinstance(on, bool):
                raise ValueError(f"checkpoint meta prep.{name}.on: {on!r} is not true or false")
            packer.on = on
