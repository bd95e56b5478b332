"""Differential privacy for every private mechanism of the suite (docs/privacy.md).

One noise source, one accountant, one upload mechanism, shared by every prompt-uploading algorithm (and by any later
private baseline):

* ``DPConfig.parse`` validates the ``dp:`` entry of ``algorithm_args.<algo>`` (``config``);
* ``client_secret(state)`` / ``gaussian_noise(shape, sigma, secret, *context)``: noise from a per-client secret that
  only the client's local state holds (``noise``);
* ``gaussian_sigma`` (calibration), ``epsilon_zcdp`` / ``epsilon_pld`` (bound / exact ε of k Gaussian releases) and
  ``accounting_metrics`` (the labelled figures logged per run), ``round_upload_metrics`` / ``run_accounting`` (what
  the engines log per round and per run) (``accounting``);
* ``GaussianUploadMechanism.privatize_upload``: clip the round update, add noise, keep clean metrics on the client
  (``mechanism``).
"""
from .accounting import (accounting_metrics, epsilon_pld, epsilon_zcdp, gaussian_sigma, round_upload_metrics,
                         run_accounting, zcdp_rho)
from .config import ACCOUNTING, DPConfig
from .mechanism import (PUBLIC_UPLOAD_METRICS, GaussianUploadMechanism, auto_update_clip, clip_grad_,
                        reports_evaluation)
from .noise import SECRET_KEY, client_secret, gaussian_noise, new_secret

__all__ = ["ACCOUNTING", "DPConfig", "GaussianUploadMechanism", "PUBLIC_UPLOAD_METRICS", "SECRET_KEY",
           "accounting_metrics", "auto_update_clip", "client_secret", "clip_grad_", "epsilon_pld", "epsilon_zcdp",
           "gaussian_noise", "gaussian_sigma", "new_secret", "reports_evaluation", "round_upload_metrics",
           "run_accounting", "zcdp_rho"]
