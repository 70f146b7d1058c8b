"""The retinal phantom: seeded, procedural pairs of colour fundus photos and fluorescein
angiography videos with known diagnoses, lesions and lesion masks.

`phantom_case(seed, i)` depends on (seed, i) alone; `write_phantom_cohort` writes a
cohort folder following the data contract; `contact_sheet` / `write_preview` show one.
"""

from .case import PhantomCase, phantom_case
from .meta import CaseMeta, case_meta
from .sheet import PHASES_S, contact_sheet, first_of_each, write_preview
from .writer import catalog_row, write_phantom_cohort

__all__ = [
    "PHASES_S",
    "CaseMeta",
    "PhantomCase",
    "case_meta",
    "catalog_row",
    "contact_sheet",
    "first_of_each",
    "phantom_case",
    "write_phantom_cohort",
    "write_preview",
]
