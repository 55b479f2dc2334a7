"""The Optuna storage a tuned study's workers share (:mod:`.tuning`): opening it (SQLite by
default, any database URL Optuna supports; workers that create a new database together all open
it) and checking that a study found there records the definition this study gives it."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError

if TYPE_CHECKING:
    import optuna

_HEARTBEAT_S, _GRACE_S = 30, 120
_OPEN_ATTEMPTS = 6  # tries to open a storage that other workers are creating at the same time
_LABEL_WAIT_S = 30.0  # the longest a worker waits for another to label the study it created


def default_storage(out: Path) -> str:
    return f"sqlite:///{out.resolve() / 'optuna.db'}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage at ``url``, with heartbeats, or a one-line :class:`ConfigError`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats are marked experimental since Optuna 2.9; they are what a shared study needs.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    attempt = 0
    while True:
        attempt += 1
        try:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {},
                heartbeat_interval=_HEARTBEAT_S,
                grace_period=_GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
            )
        except Exception as error:  # sqlalchemy's: a bad URL, a missing driver, no server
            # Workers that start together on a new database race to create its tables: the
            # losers see IntegrityError (or a locked database) and find the tables next time.
            racing = type(error).__name__ in ("IntegrityError", "OperationalError")
            if racing and attempt < _OPEN_ATTEMPTS:
                time.sleep(0.2 * attempt)
                continue
            text = str(error).strip()
            first = text.splitlines()[0] if text else type(error).__name__
            raise ConfigError(
                f"--storage {url}: cannot open it ({first}); give a database URL Optuna "
                "supports, e.g. sqlite:///path/optuna.db or postgresql://user@host/db"
            ) from None


def check_definition(
    storage: optuna.storages.RDBStorage, study_id: int, name: str, definition: str
) -> None:
    """Refuse the study ``name`` unless it records ``definition`` (JSON). A study with neither a
    definition nor trials may be one another worker has just created and is about to label:
    wait for that a while before refusing it."""
    deadline = time.monotonic() + _LABEL_WAIT_S
    while True:
        saved = storage.get_study_user_attrs(study_id).get("definition")
        if saved is not None or storage.get_n_trials(study_id) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if saved != definition:
        raise ConfigError(
            f"the storage already holds tuning study {name!r} with another definition "
            f"({_difference(saved, definition)}): name the study differently, or pass "
            "another --storage"
        )


def _difference(saved: str | None, wanted: str) -> str:
    if saved is None:
        return "none recorded"
    old, new = json.loads(saved), json.loads(wanted)
    keys = sorted(k for k in new if old.get(k) != new.get(k))
    return "differs in " + ", ".join(keys) if keys else "differs"
