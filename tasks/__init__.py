"""Task heads and evaluators (retrieval, zero-shot, lip reading, detection).

Importing this package imports every module below it, so their registrations run.
"""

from xmodal.plugins import import_submodules

import_submodules(__name__)
