"""Age from one estimator, gender from another, as one estimator."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from stream.types import Estimates

from .base import AGE, GENDER, CropSpec, Estimator


def combine(age: Estimates, gender: Estimates) -> Estimates:
    """Age columns of `age` with the p_male of `gender`."""
    if len(age) != len(gender):
        raise ValueError(
            f"age and gender estimates must cover the same faces: {len(age)} vs {len(gender)}"
        )
    return Estimates(
        age=age.age,
        p_male=gender.p_male,
        age_confidence=age.age_confidence,
        age_groups=age.age_groups,
        age_group_labels=age.age_group_labels,
        age_raw=age.age_raw,
        age_std=age.age_std,
        age_low=age.age_low,
        age_high=age.age_high,
    )


class Combined:
    """Runs an age estimator and a gender estimator on the same faces.

    Crops both need are cut once: `crops` is the union of their specs.
    """

    predicts: tuple[str, ...] = (AGE, GENDER)

    def __init__(self, age: Estimator, gender: Estimator) -> None:
        self.age = age
        self.gender = gender
        self.name = f"{age.name} (age) + {gender.name} (gender)"
        self.crops = tuple(dict.fromkeys(age.crops + gender.crops))

    def estimate(self, crops: Mapping[CropSpec, np.ndarray]) -> Estimates:
        age = self.age.estimate({spec: crops[spec] for spec in self.age.crops})
        gender = self.gender.estimate({spec: crops[spec] for spec in self.gender.crops})
        return combine(age, gender)
