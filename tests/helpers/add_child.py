"""Child process of test_locking.py: ``add()`` documents to a database, optionally SIGKILLing itself at one
step, or hold a database's writer lock for a while.

    python add_child.py add DB DOCS.json [KILL_AT] [NTH] [WHEN]   # KILL_AT: a function name of
        retlm.retrieval.add, or "replace:<substring of the destination>"; WHEN: before | after
    python add_child.py hold DB SECONDS|RELEASE_FILE
    python add_child.py read DB STOP_FILE OUT.json                # open + verify until STOP_FILE exists
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def patch_kill(kill_at: str, nth: int, when: str) -> None:
    import retlm.retrieval.add as add_module

    calls = {"n": 0}
    if kill_at.startswith("replace:"):
        wanted = kill_at.split(":", 1)[1]
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            if wanted in os.path.basename(str(dst)):
                calls["n"] += 1
                if calls["n"] == nth and when == "before":
                    die()
                real(src, dst, *args, **kwargs)
                if calls["n"] == nth and when == "after":
                    die()
                return None
            return real(src, dst, *args, **kwargs)

        os.replace = replace
        return
    real = getattr(add_module, kill_at)

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth and when == "before":
            die()
        result = real(*args, **kwargs)
        if calls["n"] == nth and when == "after":
            die()
        return result

    setattr(add_module, kill_at, wrapper)


def main() -> None:
    command, db_path = sys.argv[1], sys.argv[2]
    if command == "hold":
        from retlm.locking import writer_lock

        release = sys.argv[3]  # seconds to hold, or a file whose appearance releases the lock
        with writer_lock(os.path.join(db_path, ".lock"), what=f"database {db_path}"):
            print("locked", flush=True)
            if release.replace(".", "").isdigit():
                time.sleep(float(release))
            else:
                while not os.path.exists(release):
                    time.sleep(0.05)
        return
    from retlm import RetrievalDatabase

    if command == "read":
        stop, out = sys.argv[3], sys.argv[4]
        seen, errors = [], []
        open(out + ".ready", "w").close()
        while not os.path.exists(stop):
            try:
                db = RetrievalDatabase.open(db_path, verify=True)
                seen.append(db.manifest["checksums"])
            except Exception as err:  # recorded, and the test fails on any
                errors.append(f"{type(err).__name__}: {err}")
        with open(out, "w") as f:
            json.dump({"seen": seen, "errors": errors}, f)
        return
    args = [a for a in sys.argv if a != "--no-wait"]
    docs = json.loads(open(args[3]).read())
    if len(args) > 4:
        patch_kill(args[4], int(args[5]), args[6])
    batches = docs if docs and isinstance(docs[0], list) else [docs]  # a list of lists: one add() each
    for batch in batches:
        RetrievalDatabase.open(db_path, verify=False).add(batch, wait="--no-wait" not in sys.argv)
    print("added", flush=True)


if __name__ == "__main__":
    main()
