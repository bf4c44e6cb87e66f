"""Realistic synthetic RT-DC measurements, written the way dclab writes them.

Each event is a cell-like object in a microfluidic channel: an ellipse that is darker than the
background with a bright halo, on a static background with wall shadows and illumination
gradient plus per-frame noise. Scalar features are computed from the geometry and from the
actual pixels (area, deformation, brightness inside the mask, …), fluorescence traces are noisy
Gaussian pulses whose peak features (`fl1_max`, `fl1_pos`, …) are derived from the stored
traces. Files carry the metadata sections dclab and DCOR expect, logs and a compound table.

Writing goes through `dclab.RTDCWriter` (Zstd level 5 + fletcher32, ~1 MiB chunks, or gzip, or
no compression), in batches, so that 100,000 events with images stay within a few hundred MB of
memory. Options reproduce files from the field the mount must serve as dclab does: image
datasets stored longer than the event count (an early dclab writer), and a Shape-In 2.0.6 file
whose `aspect` and float32 `time` dclab takes for defective (it hides them, and computes `time`).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

PIXEL_SIZE = 0.34  # µm
FRAME_RATE = 3000.0  # Hz
TRACE_NAMES = ("fl1_median", "fl1_raw", "fl2_median", "fl2_raw", "fl3_median", "fl3_raw")
SAMPLE_RATE = 312500  # Hz, fluorescence
BASELINE = 120  # trace baseline (ADC counts)


@dataclass(frozen=True)
class SampleSpec:
    """What one generated measurement contains."""

    events: int = 5000
    seed: int = 0
    images: bool = True
    image_bg: bool = False
    contour: bool = False  # each event's outline as dclab stores contours (`events/contour`)
    image_shape: tuple[int, int] = (80, 250)
    traces: bool = True
    trace_samples: int = 177
    sample: str = "HL60 cells"
    run_index: int = 1
    batch: int = 512
    # "zstd" (dclab's default: Zstd level 5), "gzip" or "none"; fletcher32 with either filter
    compression: str = "zstd"
    # image, image_bg and mask stored with this many frames more than the event count
    overlong: int = 0
    # written as Shape-In 2.0.6 did: its `aspect` defective (a wrong cast), `time` as float32
    shapein_legacy: bool = False


COMPRESSIONS = ("zstd", "gzip", "none")


def _compression(name: str) -> dict[str, Any]:
    """The writer's `compression_kwargs` for a `SampleSpec.compression`."""
    import hdf5plugin

    if name == "zstd":
        return dict(hdf5plugin.Zstd(clevel=5))
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    if name == "none":
        return {}
    raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, not {name!r}")


def write_rtdc(
    path: str | Path,
    spec: SampleSpec | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a synthetic measurement to `path` (atomically) and return the path.

    `progress(done, total)` is called after each batch of events.
    """
    import dclab

    spec = spec or SampleSpec()
    if spec.events < 1:
        raise ValueError("a measurement needs at least one event")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    synth = _Synthesizer(spec, rng)
    tmp = path.with_name(path.name + ".part")
    compression = _compression(spec.compression)
    with dclab.RTDCWriter(tmp, mode="reset", compression_kwargs=compression) as hw:
        hw.store_metadata(_metadata(spec))
        pending = _PendingFeatures(hw)
        done = 0
        while done < spec.events:
            count = min(spec.batch, spec.events - done)
            scalars, traces, images = synth.batch(first=done, count=count)
            pending.add(scalars, traces)
            for name, data in images.items():
                hw.store_feature(name, data)
            done += count
            if progress is not None:
                progress(done, spec.events)
        if spec.overlong and spec.images:
            # more frames than events: what dclab shows is cut to the event count
            _, _, extra = synth.batch(first=done, count=spec.overlong)
            for name, data in extra.items():
                hw.store_feature(name, data)
        pending.flush()
        hw.store_log("src_acquisition", _acquisition_log(spec))
        hw.store_log(
            "dcorfs-sample", [f"{k}: {json.dumps(v)}" for k, v in sorted(asdict(spec).items())]
        )
        hw.store_table("src_monitor", _monitor_table(spec, rng))
    tmp.replace(path)
    return path


class _PendingFeatures:
    """Collects scalar and trace batches and hands them to the writer in chunk-sized runs.

    HDF5 recompresses a partially filled chunk on every append; writing whole chunks keeps
    generation linear in the number of events.
    """

    def __init__(self, writer: Any, trace_flush_rows: int = 8192) -> None:
        self._writer = writer
        self._scalars: dict[str, list[np.ndarray]] = {}
        self._traces: dict[str, list[np.ndarray]] = {}
        self._trace_rows = 0
        self._trace_flush_rows = trace_flush_rows

    def add(self, scalars: dict[str, np.ndarray], traces: dict[str, np.ndarray]) -> None:
        for name, values in scalars.items():
            self._scalars.setdefault(name, []).append(values)
        for name, values in traces.items():
            self._traces.setdefault(name, []).append(values)
        if traces:
            self._trace_rows += len(next(iter(traces.values())))
            if self._trace_rows >= self._trace_flush_rows:
                self._flush_traces()

    def _flush_traces(self) -> None:
        if self._traces:
            data = {name: np.concatenate(parts) for name, parts in self._traces.items()}
            self._writer.store_feature("trace", data)
        self._traces = {}
        self._trace_rows = 0

    def flush(self) -> None:
        self._flush_traces()
        for name, parts in self._scalars.items():
            self._writer.store_feature(name, np.concatenate(parts))
        self._scalars = {}


def _normal_lut(sigma: float) -> np.ndarray:
    """256 quantiles of N(0, sigma), as int16: a uint8 draw indexes it (much cheaper than
    drawing Gaussian floats for every pixel)."""
    from statistics import NormalDist

    dist = NormalDist(0.0, sigma)
    quantiles = [dist.inv_cdf((i + 0.5) / 256) for i in range(256)]
    lut: np.ndarray = np.rint(np.array(quantiles)).astype(np.int16)
    return lut


class _Synthesizer:
    """Makes batches of events: scalar features, traces and images that agree with each other."""

    def __init__(self, spec: SampleSpec, rng: np.random.Generator) -> None:
        self.spec = spec
        self.rng = rng
        self.background = _background(spec.image_shape, rng)
        self.background_i16 = np.rint(self.background).astype(np.int16)
        self.noise_lut = _normal_lut(2.5)
        self.texture_lut = _normal_lut(4.0)
        self.frame0 = int(rng.integers(1000, 5000))

    def batch(
        self, first: int, count: int
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
        spec, rng = self.spec, self.rng
        height, width = spec.image_shape
        # geometry of the ellipses (pixels); cells are elongated along the flow (x)
        semi_b = np.clip(
            rng.normal(0.2 * height, 0.03 * height, count), 0.08 * height, 0.3 * height
        )
        aspect = 1.0 + np.abs(rng.normal(0.3, 0.2, count))
        semi_a = np.minimum(semi_b * aspect, 0.2 * width)
        center_x = rng.uniform(semi_a + 2, width - semi_a - 2)
        center_y = height / 2 + rng.normal(0, 0.04 * height, count)

        yy = np.arange(height, dtype=np.float32)[None, :, None]
        xx = np.arange(width, dtype=np.float32)[None, None, :]
        dx = (xx - center_x.astype(np.float32)[:, None, None]) / semi_a.astype(np.float32)[
            :, None, None
        ]
        dy = (yy - center_y.astype(np.float32)[:, None, None]) / semi_b.astype(np.float32)[
            :, None, None
        ]
        r2 = dx * dx + dy * dy
        mask = r2 <= 1.0
        halo = (r2 > 1.0) & (r2 <= 1.35)
        del dx, dy, r2
        darkness = rng.integers(12, 30, count).astype(np.int16)[:, None, None]
        shape = (count, height, width)
        image_i16 = self.noise_lut[rng.integers(0, 256, shape, dtype=np.uint8)]
        image_i16 += self.background_i16[None]
        texture = self.texture_lut[rng.integers(0, 256, shape, dtype=np.uint8)] - darkness
        image_i16 += np.where(mask, texture, np.int16(18) * halo)
        image = np.clip(image_i16, 0, 255).astype(np.uint8)
        del image_i16, texture

        area_px = mask.sum(axis=(1, 2)).astype(np.float64)
        inside = np.where(mask, image, 0).astype(np.int32)
        bright_avg = inside.sum(axis=(1, 2)) / area_px
        bright_sq = (inside * inside).sum(axis=(1, 2)) / area_px
        bright_sd = np.sqrt(np.maximum(bright_sq - bright_avg**2, 0))
        bg_inside = np.where(mask, self.background[None], 0).sum(axis=(1, 2)) / area_px

        a_um, b_um = semi_a * PIXEL_SIZE, semi_b * PIXEL_SIZE
        perimeter = np.pi * (3 * (a_um + b_um) - np.sqrt((3 * a_um + b_um) * (a_um + 3 * b_um)))
        area_um = area_px * PIXEL_SIZE**2
        circ = 2 * np.sqrt(np.pi * np.pi * a_um * b_um) / perimeter
        frames = self.frame0 + (first + np.arange(count)) * 3 + rng.integers(0, 3, count)
        inertia = np.sqrt(semi_a / semi_b)
        scalars = {
            "area_cvx": area_px * 1.01,
            "area_msd": area_px,
            "area_ratio": 1.01 + rng.normal(0, 0.002, count),
            "area_um": area_um,
            "area_um_raw": area_um * 1.02,
            "aspect": semi_a / semi_b,
            "bg_med": np.median(self.background) + rng.normal(0, 0.3, count),
            "bg_off": rng.normal(0, 0.4, count),
            "bright_avg": bright_avg,
            "bright_sd": bright_sd,
            "bright_bc_avg": bright_avg - bg_inside,
            "bright_bc_sd": bright_sd * 0.97,
            "bright_perc_10": bright_avg - 1.2816 * bright_sd,
            "bright_perc_90": bright_avg + 1.2816 * bright_sd,
            "circ": circ,
            "deform": 1 - circ,
            "deform_raw": (1 - circ) * 1.05,
            "eccentr_prnc": np.sqrt(1 - (semi_b / semi_a) ** 2),
            "inert_ratio_cvx": inertia,
            "inert_ratio_prnc": inertia * 1.01,
            "inert_ratio_raw": inertia * 0.99,
            "nevents": np.ones(count),
            "per_ratio": 1.02 + rng.normal(0, 0.005, count),
            "per_um_raw": perimeter * 1.02,
            "pos_x": center_x * PIXEL_SIZE,
            "pos_y": center_y * PIXEL_SIZE,
            "size_x": 2 * a_um,
            "size_y": 2 * b_um,
            "temp": 23.0 + rng.normal(0, 0.05, count),
            "temp_amb": 22.5 + rng.normal(0, 0.05, count),
            "tex_con_avg": rng.gamma(2.0, 1.5, count),
            "tex_ent_avg": rng.normal(3.5, 0.2, count),
            "tilt": np.abs(rng.normal(0, 0.05, count)),
        }
        # Shape-In stores scalar features as float32 (dclab makes the integer ones uint32/64)
        scalars = {name: values.astype(np.float32) for name, values in scalars.items()}
        scalars["frame"] = frames.astype(np.uint64)
        if spec.shapein_legacy:  # Shape-In's low-precision time (dclab computes it anew)
            scalars["time"] = ((frames - self.frame0) / FRAME_RATE).astype(np.float32)
        scalars["index_online"] = ((first + np.arange(count)) * 2 + 1).astype(np.uint32)

        traces: dict[str, np.ndarray] = {}
        if spec.traces:
            traces, peak_features = _traces(spec, rng, count)
            scalars.update(peak_features)
        images: dict[str, np.ndarray] = {}
        if spec.images:
            images["image"] = image
            images["mask"] = mask
            if spec.image_bg:
                bg = self.noise_lut[rng.integers(0, 256, shape, dtype=np.uint8)] // 3
                bg += self.background_i16[None]
                images["image_bg"] = np.clip(bg, 0, 255).astype(np.uint8)
        if spec.contour:  # a list: dclab's writer stores one dataset per event
            images["contour"] = _outlines(center_x, center_y, semi_a, semi_b)  # type: ignore[assignment]
        return scalars, traces, images


def _outlines(
    center_x: np.ndarray, center_y: np.ndarray, semi_a: np.ndarray, semi_b: np.ndarray
) -> list[np.ndarray]:
    """The pixel outline of each ellipse: (x, y) int64 points, as many as its perimeter has
    pixels (consecutive duplicates dropped), so events have contours of different lengths."""
    found = []
    for cx, cy, a, b in zip(center_x, center_y, semi_a, semi_b, strict=True):
        count = max(8, int(2 * np.pi * max(a, b)))
        angle = np.linspace(0, 2 * np.pi, count, endpoint=False)
        points = np.rint(np.stack([cx + a * np.cos(angle), cy + b * np.sin(angle)], axis=1))
        keep = np.any(points != np.roll(points, 1, axis=0), axis=1)
        found.append(points[keep].astype(np.int64))
    return found


def _background(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Static channel background: walls, illumination gradient, fixed-pattern noise."""
    height, width = shape
    rows = np.arange(height, dtype=np.float32)
    cols = np.arange(width, dtype=np.float32)
    illumination = 112 + 10 * np.sin(np.pi * rows / height)[:, None] - 6 * (cols / width)[None, :]
    wall = max(2, height // 16)
    illumination[:wall] -= 45
    illumination[-wall:] -= 45
    pattern = rng.normal(0, 1.5, (1, width)).astype(np.float32)
    return (illumination + pattern).astype(np.float32)


def _traces(
    spec: SampleSpec, rng: np.random.Generator, count: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    samples = spec.trace_samples
    t = np.arange(samples, dtype=np.float64)[None, :]
    traces: dict[str, np.ndarray] = {}
    features: dict[str, np.ndarray] = {}
    for channel, brightness in ((1, 900.0), (2, 300.0), (3, 60.0)):
        amplitude = rng.lognormal(np.log(brightness), 0.5, count)[:, None]
        center = samples / 2 + rng.normal(0, samples / 20, count)[:, None]
        sigma = rng.uniform(samples / 25, samples / 12, count)[:, None]
        pulse = amplitude * np.exp(-0.5 * ((t - center) / sigma) ** 2)
        raw = BASELINE + pulse + rng.normal(0, 8, (count, samples))
        smooth = _moving_average(raw, 5)
        raw16 = np.clip(np.rint(raw), -32768, 32767).astype(np.int16)
        median16 = np.clip(np.rint(smooth), -32768, 32767).astype(np.int16)
        traces[f"fl{channel}_raw"] = raw16
        traces[f"fl{channel}_median"] = median16
        peak = median16.max(axis=1).astype(np.float64) - BASELINE
        features[f"fl{channel}_max"] = np.maximum(peak, 0).astype(np.uint32)
        features[f"fl{channel}_pos"] = (
            median16.argmax(axis=1).astype(np.float32) * 1e6 / SAMPLE_RATE
        ).astype(np.float32)
        features[f"fl{channel}_width"] = (2.355 * sigma[:, 0] * 1e6 / SAMPLE_RATE).astype(
            np.float32
        )
        features[f"fl{channel}_area"] = (
            np.clip(median16.astype(np.float64) - BASELINE, 0, None).sum(axis=1)
        ).astype(np.float32)
        features[f"fl{channel}_npeaks"] = np.ones(count, dtype=np.uint32)
    return traces, features


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average along the last axis (edges padded with the edge value)."""
    half = window // 2
    padded = np.pad(values, ((0, 0), (half, window - 1 - half)), mode="edge")
    csum = np.cumsum(padded, axis=1)
    csum = np.concatenate([np.zeros((len(values), 1)), csum], axis=1)
    average: np.ndarray = (csum[:, window:] - csum[:, :-window]) / window
    return average


def _metadata(spec: SampleSpec) -> dict[str, dict[str, object]]:
    height, width = spec.image_shape
    rng = np.random.default_rng(spec.seed + 7)
    day = 1 + spec.seed % 28
    meta: dict[str, dict[str, object]] = {
        "experiment": {
            "date": f"2026-03-{day:02d}",
            "event count": spec.events,
            "run index": spec.run_index,
            "run identifier": f"dcorfs-sample-{uuid.UUID(int=int(rng.integers(2**62)))}",
            "sample": spec.sample,
            "time": f"{9 + spec.run_index % 8:02d}:{(spec.seed * 7) % 60:02d}:13",
        },
        "imaging": {
            "flash device": "LED (ZMD L1)",
            "flash duration": 2.0,
            "frame rate": FRAME_RATE,
            "pixel size": PIXEL_SIZE,
            "roi position x": 629,
            "roi position y": 512,
            "roi size x": width,
            "roi size y": height,
        },
        "online_contour": {
            "bin area min": 10,
            "bin kernel": 5,
            "bin threshold": -6,
            "image blur": 0,
            "no absdiff": True,
        },
        "setup": {
            "channel width": 20.0,
            "chip identifier": "PDMS-20-03",
            "chip region": "channel",
            "flow rate": 0.06,
            "flow rate sample": 0.02,
            "flow rate sheath": 0.04,
            "identifier": "dcorfs-synthetic-setup",
            "medium": "CellCarrierB",
            "module composition": "AcCellerator",
            "software version": "ShapeIn 2.0.6" if spec.shapein_legacy else "dcorfs-sample 1.0",
            "temperature": 23.0,
        },
    }
    if spec.traces:
        meta["fluorescence"] = {
            "bit depth": 16,
            "channel count": 3,
            "channels installed": 3,
            "channel 1 name": "FITC",
            "channel 2 name": "PE",
            "channel 3 name": "APC",
            "laser count": 3,
            "lasers installed": 3,
            "laser 1 lambda": 488.0,
            "laser 1 power": 5.0,
            "laser 2 lambda": 561.0,
            "laser 2 power": 5.0,
            "laser 3 lambda": 640.0,
            "laser 3 power": 5.0,
            "sample rate": float(SAMPLE_RATE),
            "samples per event": spec.trace_samples,
            "signal max": 1.0,
            "signal min": -1.0,
            "trace median": 5,
        }
    return meta


def _acquisition_log(spec: SampleSpec) -> list[str]:
    return [
        "[acquisition] dcorfs synthetic recording",
        f"[acquisition] sample: {spec.sample}; run index {spec.run_index}",
        f"[acquisition] frame rate {FRAME_RATE} Hz, "
        f"ROI {spec.image_shape[1]}x{spec.image_shape[0]}",
        f"[acquisition] recorded {spec.events} events",
        "[acquisition] measurement finished",
    ]


def _monitor_table(spec: SampleSpec, rng: np.random.Generator) -> np.ndarray:
    rows = max(3, spec.events // 1000)
    dtype = np.dtype(
        [
            ("time", np.float64),
            ("temperature", np.float64),
            ("flow_rate_sample", np.float64),
            ("flow_rate_sheath", np.float64),
            ("pressure_sample", np.float64),
            ("pressure_sheath", np.float64),
        ]
    )
    table = np.zeros(rows, dtype=dtype).view(np.recarray)
    table["time"] = np.linspace(0, spec.events / FRAME_RATE * 3, rows)
    table["temperature"] = 23.0 + rng.normal(0, 0.05, rows)
    table["flow_rate_sample"] = 0.02
    table["flow_rate_sheath"] = 0.04
    table["pressure_sample"] = 1200 + rng.normal(0, 5, rows)
    table["pressure_sheath"] = 1250 + rng.normal(0, 5, rows)
    return table


def write_processed(
    raw: str | Path, path: str | Path, *, keep: np.ndarray | None = None, seed: int = 0
) -> Path:
    """Write `path` the way dcnum writes its output `X_dcn.rtdc` for the raw input `raw`
    (basin strategy "tap"): scalar features only, plus an HDF5 *file* basin to `raw` (its
    absolute and relative path, its run identifier) for the raw file's other features.

    `keep`: None for identical segmentation (mapping `same`, the output keeps the raw file's
    run identifier); else the raw event of each output event (a subset, reordered or
    repeated: re-segmentation), stored as `basinmap0`, and the run identifier becomes
    `<raw id>_dcn-<hash>`. See dcnum `logic/ctrl.py` ~446-461, 516-576, 655-670 and
    `write/writer.py` `store_basin`; doc/DCOR.md §3.
    """
    import dclab
    import h5py

    raw, path = Path(raw), Path(path)
    rng = np.random.default_rng(seed)
    with h5py.File(raw, "r") as h5_raw:
        attrs = dict(h5_raw.attrs)
        events = h5_raw["events"]
        size_raw = int(attrs.get("experiment:event count") or len(events["deform"]))
        index = np.arange(size_raw) if keep is None else np.asarray(keep, dtype=np.uint64)
        scalars = {
            name: events[name][:][index]
            for name in events
            if isinstance(events[name], h5py.Dataset) and events[name].ndim == 1
        }
        others = sorted(name for name in events if name not in scalars)
        logs = {name: [_text(line) for line in h5_raw["logs"][name]] for name in h5_raw["logs"]}
        tables = {name: h5_raw["tables"][name][:] for name in h5_raw.get("tables", {})}
    # "recomputed" by the pipeline: what dcnum's feature extraction yields differs a little
    for name in ("deform", "area_um", "bright_avg"):
        if name in scalars:
            noise = rng.normal(1.0, 0.001, len(index))
            scalars[name] = (scalars[name] * noise).astype(scalars[name].dtype)
    run_id = str(attrs["experiment:run identifier"])
    if keep is not None:
        run_id = f"{run_id}_dcn-{int(rng.integers(2**28)):07x}"
    tmp = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    with dclab.RTDCWriter(tmp, mode="reset") as hw:
        for name, values in sorted(scalars.items()):
            hw.store_feature(name, values)
        if keep is not None:
            hw.store_feature("basinmap0", index)
        for name, lines in logs.items():
            hw.store_log(name, lines)
        hw.store_log("dcnum-log", ["[dcnum] basin strategy: tap", f"[dcnum] input: {raw.name}"])
        for name, table in tables.items():
            hw.store_table(name, table)
        h5 = hw.h5file
        # dcnum copies the raw file's metadata (`copy_metadata`), then sets its own
        for key, value in attrs.items():
            h5.attrs[key] = value
        h5.attrs["experiment:event count"] = len(index)
        h5.attrs["experiment:run identifier"] = run_id
        _store_file_basin(
            h5,
            {
                "description": "Created with dcnum 0.25.0 (dcorfs sample)",
                "name": "dcnum basin",
                "format": "hdf5",
                "paths": [str(raw.resolve()), os.path.relpath(raw.resolve(), path.parent)],
                "type": "file",
                "identifier": str(attrs["experiment:run identifier"]),
                "features": others,
                **({} if keep is None else {"mapping": "basinmap0"}),
            },
        )
    tmp.replace(path)
    return path


def _store_file_basin(h5: Any, basin: dict[str, Any]) -> None:
    """A basin as dcnum's `HDF5Writer.store_basin` stores it: JSON lines in `basins/<md5>`."""
    import hashlib

    text = json.dumps(basin, indent=2)
    lines = text.split("\n")
    h5.require_group("basins").create_dataset(
        hashlib.md5(text.encode("utf-8")).hexdigest(),
        data=lines,
        shape=(len(lines),),
        dtype=f"S{max(len(line) for line in lines)}",
        chunks=True,
    )


def _text(line: Any) -> str:
    return line.decode("utf-8") if isinstance(line, bytes) else str(line)
