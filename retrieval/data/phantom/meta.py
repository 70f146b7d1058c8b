"""Who each phantom case is: patient, eye, age, sex, diagnosis, split and frame times.

Everything here is cheap and depends on (seed, index) alone, so a cohort can be
planned (e.g. "the first case of each diagnosis") without rendering any image.
Cases 2k and 2k+1 form a pair: with probability `BOTH_EYES_P`, decided from
(seed, k), they are the OD and OS of one patient; otherwise two patients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval.data.cohort import hash_split

BOTH_EYES_P = 0.45
# Patient conditions and how often they occur; each maps to eye-level diagnoses.
CONDITIONS = ("normal", "DR", "RVO", "AMD", "CSC")
CONDITION_P = (0.13, 0.25, 0.27, 0.18, 0.17)
# (mean age, sd, min, max, probability male) per condition
AGE_SEX = {
    "normal": (50.0, 16.0, 18, 88, 0.5),
    "DR": (58.0, 11.0, 25, 88, 0.55),
    "RVO": (66.0, 10.0, 40, 92, 0.5),
    "AMD": (76.0, 7.0, 55, 95, 0.4),
    "CSC": (44.0, 7.0, 26, 66, 0.8),
}
_SALT_PATIENT, _SALT_EYE = 11, 12


@dataclass(frozen=True)
class CaseMeta:
    seed: int
    index: int
    case_id: str
    patient_id: str
    eye: str  # "OD" / "OS"
    age: int
    sex: str  # "M" / "F"
    diagnosis: str
    split: str
    pigment: float  # 0 = blond fundus (tigroid), 1 = heavily pigmented
    arrival_s: float  # arm-to-retina time: choroidal flush starts here


def check_seed(seed: int) -> None:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def case_meta(seed: int, index: int) -> CaseMeta:
    """The metadata of case `index` of the cohort `seed` (no rendering)."""
    check_seed(seed)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    k, second = divmod(index, 2)
    prng = np.random.default_rng([seed, k, _SALT_PATIENT])
    both = prng.random() < BOTH_EYES_P
    if not both:  # two one-eyed patients share the pair slot: each gets their own draws
        prng = np.random.default_rng([seed, k, _SALT_PATIENT, 1 + second])
    condition = CONDITIONS[prng.choice(len(CONDITIONS), p=CONDITION_P)]
    mean, sd, lo, hi, p_male = AGE_SEX[condition]
    age = int(np.clip(round(prng.normal(mean, sd)), lo, hi))
    sex = "M" if prng.random() < p_male else "F"
    pigment = float(prng.beta(2.0, 2.0))
    first_eye = "OD" if prng.random() < 0.5 else "OS"
    affected = first_eye  # the eye a one-eyed disease hits, in a two-eyed patient
    fellow_sick = prng.random()  # shared draw: is the fellow eye affected too?
    sub = prng.random()  # shared draw: which sub-diagnosis the patient has
    if both:
        eye = ("OD", "OS")[second]
        patient_id = f"ph{seed}-p{k:05d}"
    else:
        eye = first_eye
        patient_id = f"ph{seed}-p{k:05d}{'ab'[second]}"
    erng = np.random.default_rng([seed, index, _SALT_EYE])
    diagnosis = _eye_diagnosis(condition, eye == affected or not both, fellow_sick, sub, erng)
    vascular = 1.0 if condition in ("DR", "RVO") else 0.0
    arrival = 8.0 + 4.5 * np.clip((age - 20) / 70, 0, 1) + vascular + erng.uniform(-1.2, 1.2)
    return CaseMeta(
        seed=seed,
        index=index,
        case_id=f"ph{seed}-{index:05d}",
        patient_id=patient_id,
        eye=eye,
        age=age,
        sex=sex,
        diagnosis=diagnosis,
        split=hash_split(patient_id, seed),
        pigment=float(np.clip(pigment + erng.normal(0, 0.05), 0, 1)),
        arrival_s=float(np.clip(arrival, 8.0, 15.0)),
    )


def _eye_diagnosis(
    condition: str, primary: bool, fellow_sick: float, sub: float, rng: np.random.Generator
) -> str:
    """Eye-level diagnosis: DR is bilateral, AMD often, RVO and CSC mostly one eye."""
    if condition == "normal":
        return "normal"
    if condition == "DR":
        return "PDR" if rng.random() < (0.45 if primary else 0.3) else "NPDR"
    if condition == "RVO":
        return ("BRVO" if sub < 0.5 else "CRVO") if primary else "normal"
    if condition == "AMD":
        return "wet-AMD" if primary or fellow_sick < 0.35 else "normal"
    return "CSC" if primary or fellow_sick < 0.2 else "normal"


def frame_times(rng: np.random.Generator, frames: int, arrival_s: float) -> np.ndarray:
    """(T,) acquisition times in [0, 600] s: one before the dye, dense transit, sparse late.

    The middle frames are quantiles of a density that is high during transit
    (arrival to arrival + 25 s), moderate until 2 min and low until 8 min; the
    last frame is late (9.3–10 min). Jittered per case, strictly increasing.
    """
    late = rng.uniform(560.0, 600.0)
    if frames == 2:
        return np.array([arrival_s + rng.uniform(12.0, 18.0), late])
    if frames == 3:
        return np.array([arrival_s + rng.uniform(1.5, 3.0), arrival_s + rng.uniform(12, 18), late])
    pre = rng.uniform(0.3, 0.6) * arrival_s
    edges = np.array([arrival_s - 0.5, arrival_s + 25.0, 120.0, 480.0])
    mass = np.array([0.64, 0.22, 0.14])
    u = (np.arange(frames - 2) + 0.5 + rng.uniform(-0.3, 0.3, frames - 2)) / (frames - 2)
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    middle = np.interp(u, cdf, edges)
    times = np.concatenate([[pre], middle, [late]])
    gap = 0.05
    for i in range(1, frames):  # enforce a minimum gap (only matters for huge T)
        times[i] = max(times[i], times[i - 1] + gap)
    if times[-1] > 600.0:
        times = np.minimum(times, 600.0 - gap * np.arange(frames)[::-1])
    return np.round(times, 3)
