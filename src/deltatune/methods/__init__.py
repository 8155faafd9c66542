"""Built-in delta methods. Importing a method's package registers it; the order of the
imports below is the listing order (one per line, so that adding a method adds one line)."""

from . import lora  # noqa: F401
from . import adapter  # noqa: F401
from . import prefix  # noqa: F401
from . import prompt  # noqa: F401
from . import ia3  # noqa: F401
from . import bitfit  # noqa: F401
from . import head  # noqa: F401
from . import dense  # noqa: F401
from . import fusion  # noqa: F401
from . import loha  # noqa: F401
from . import lokr  # noqa: F401
from . import tiedlora  # noqa: F401
from . import msplora  # noqa: F401
from . import oft  # noqa: F401
from . import ether  # noqa: F401
from . import road  # noqa: F401
from . import diablo  # noqa: F401
from . import paca  # noqa: F401
from . import neuroada  # noqa: F401
from . import loraxs  # noqa: F401
from . import edora  # noqa: F401
from . import abba  # noqa: F401
from . import adalora  # noqa: F401
from . import dylora  # noqa: F401
from . import vera  # noqa: F401
from . import vblora  # noqa: F401
from . import adapterbias  # noqa: F401
from . import hydra  # noqa: F401
from . import molora  # noqa: F401
from . import compacter  # noqa: F401
from . import sparseadapter  # noqa: F401
from . import reft  # noqa: F401
from . import llamaadapter  # noqa: F401
from . import aligner  # noqa: F401
from . import hyperadapter  # noqa: F401
from . import eigenlora  # noqa: F401
from . import full  # noqa: F401  (the full fine-tuning reference, listed last)
