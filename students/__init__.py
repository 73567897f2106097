"""Student architectures (small CLIPs, lip readers, BEV students).

Importing this package imports every module below it, so their registrations run.
"""

from xmodal.plugins import import_submodules

import_submodules(__name__)
