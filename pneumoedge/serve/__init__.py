"""`pneumoedge serve`: a local web page and JSON API over one loaded model (needs the [serve] extra).

Results are decision support for clinicians, never a diagnosis.
"""

from pneumoedge.serve.app import create_app
from pneumoedge.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
