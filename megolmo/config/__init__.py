"""megolmo's configuration: the typed schema (``schema``), composing it from ``conf/`` and overrides
(``load``), and the generated key reference (``python -m megolmo.config --markdown``)."""
from megolmo.config.load import CONF_DIR, load_config
from megolmo.config.schema import MegolmoConfig

__all__ = ["CONF_DIR", "MegolmoConfig", "load_config"]
