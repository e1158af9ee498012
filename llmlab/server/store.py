"""The feedback store: conversations of the web chat and what users say about the answers, in one SQLite file.

Users rate answers (-1, 0, +1), flag them (with a reason and, optionally, the answer they wanted: a
correction), regenerate them, edit their own messages and pick the better of two answers side by side. The
store keeps all of it; `snapshot` reads it whole, and llmlab.data.feedback turns that into training data
(`llmlab feedback export` writes it as JSONL).

History is never deleted (except with its conversation). Each message records its parent: the message it
follows, i.e. the last active one when it was added, so a message's prompt is exactly what was on screen
when it was written, however the conversation was edited later. An assistant message added right after an
active assistant message is an alternative answer to the same prompt (a side-by-side comparison) and takes
that message's parent. Editing a user message adds the new text as a new message in its place and
deactivates the old one and everything after it; regenerating is `deactivate_message` then `add_message`.
Inactive messages are hidden from `get_conversation` but kept for export.

Durability and concurrency: WAL journal with synchronous=FULL, and every public write is one transaction
committed before the method returns, so a process killed with SIGKILL (or a power cut) never loses a write
whose call returned. One connection serves all threads (FastAPI's pool and the event loop) behind a lock;
other processes (the export command) read consistent snapshots while the server writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from llmlab.errors import LLMLabError

SCHEMA_VERSION = 1
ROLES = ("system", "user", "assistant")
RATINGS = (-1, 0, 1)

SCHEMA = """
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    system TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    tool_calls TEXT NOT NULL,
    model TEXT,
    settings TEXT NOT NULL,
    active INTEGER NOT NULL,
    created REAL NOT NULL,
    UNIQUE (conversation_id, position)
);
CREATE INDEX messages_parent ON messages(parent_id);
CREATE TABLE ratings (
    message_id INTEGER NOT NULL UNIQUE REFERENCES messages(id) ON DELETE CASCADE,
    rating INTEGER NOT NULL CHECK (rating IN (-1, 0, 1)),
    updated REAL NOT NULL
);
CREATE TABLE flags (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    reason TEXT NOT NULL,
    correction TEXT,
    created REAL NOT NULL
);
CREATE INDEX flags_message ON flags(message_id);
CREATE TABLE comparisons (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    message_a INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    message_b INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    chosen INTEGER REFERENCES messages(id) ON DELETE CASCADE,
    created REAL NOT NULL
);
"""
TABLES = {"conversations", "messages", "ratings", "flags", "comparisons"}


def _conversation(row: sqlite3.Row) -> dict:
    return {k: row[k] for k in ("id", "title", "system", "created", "updated")}


def _comparison(row: sqlite3.Row) -> dict:
    return {k: row[k] for k in ("id", "conversation_id", "message_a", "message_b", "chosen", "created")}


@dataclass
class Snapshot:
    """The whole store at one moment (`FeedbackStore.snapshot`), as plain dicts."""

    conversations: dict[int, dict]
    """by id: id, title, system, created, updated"""
    messages: dict[int, dict]
    """by id, active or not, as `get_message` returns them (with rating and flags)"""
    comparisons: list[dict]
    """oldest first: id, conversation_id, message_a, message_b, chosen (None until decided), created"""
    flags: list[dict]
    """oldest first: id, message_id, reason, correction (None without one), created"""


def _check_tool_calls(tool_calls: list[dict]) -> list[dict]:
    if not isinstance(tool_calls, list):
        raise LLMLabError(f"tool_calls must be a list of {{'call': str, 'result': str}}, "
                          f"got {type(tool_calls).__name__}")
    for call in tool_calls:
        if not (isinstance(call, dict) and isinstance(call.get("call"), str) and isinstance(call.get("result"), str)):
            raise LLMLabError(f"each tool call is {{'call': 'calculator 2*3', 'result': '6'}} (two strings), "
                              f"got {call!r}")
    return [{"call": c["call"], "result": c["result"]} for c in tool_calls]


class FeedbackStore:
    """Conversations, messages, ratings, flags and comparisons in a SQLite file; see the module docstring.

    Every method returns plain JSON-able dicts and lists; ids are ints. `get_*` return None for an unknown id,
    methods that change a message or comparison raise LLMLabError for one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = self._open()

    # ------------------------------------------------------------------------------------------------- opening

    def _open(self) -> sqlite3.Connection:
        if self.path.is_dir():
            raise LLMLabError(f"the feedback store path {self.path} is a directory: give a file path such as "
                              f"{self.path / 'feedback.db'}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # autocommit mode (isolation_level=None): transactions are the explicit BEGIN/COMMIT of _transaction
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise LLMLabError(f"cannot open the feedback store {self.path}: {e}: check the path and its "
                              f"permissions") from None
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA user_version").fetchone()  # reads the header: fails on a file that is no database
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: survives power loss too
            db.execute("PRAGMA foreign_keys=ON")
            self._check_schema(db)
        except sqlite3.DatabaseError as e:
            db.close()
            raise LLMLabError(f"{self.path} is not a feedback store ({e}): give the path of a feedback .db file, "
                              f"or a new path to create one") from None
        except LLMLabError:
            db.close()
            raise
        return db

    def _check_schema(self, db: sqlite3.Connection) -> None:
        """Create the schema in a new file; refuse a file of another schema or of a newer version."""
        db.execute("BEGIN IMMEDIATE")  # two processes creating the same new file: the second sees the schema
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            tables.discard("sqlite_sequence")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LLMLabError(f"the feedback store {self.path} has schema version {version}, newer than this "
                                  f"llmlab reads ({SCHEMA_VERSION}): upgrade llmlab")
            if version == 0 and not tables:
                for statement in SCHEMA.split(";"):  # not executescript: it would commit this transaction
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version == 0 or not TABLES <= tables:
                raise LLMLabError(f"{self.path} is a SQLite database but not a feedback store (tables: "
                                  f"{', '.join(sorted(tables)) or 'none'}): give another path; the store creates "
                                  f"its own file")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the connection (idempotent); the store cannot be used afterwards."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock: IMMEDIATE for writes (the write lock is taken up front, so it never
        fails half-way on a busy database), DEFERRED for reads (a consistent snapshot across several queries)."""
        with self._lock:
            if self._db is None:
                raise LLMLabError(f"the feedback store {self.path} is closed: open a new FeedbackStore")
            db = self._db
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------------------------------------- conversations

    def create_conversation(self, title: str = "", system: str = "") -> dict:
        """A new, empty conversation; `system` is its system prompt ("" for none)."""
        if not isinstance(title, str) or not isinstance(system, str):
            raise LLMLabError("create_conversation: title and system must be strings")
        now = time.time()
        with self._transaction() as db:
            cur = db.execute("INSERT INTO conversations (title, system, created, updated) VALUES (?, ?, ?, ?)",
                             (title, system, now, now))
            return _conversation(db.execute("SELECT * FROM conversations WHERE id = ?", (cur.lastrowid,)).fetchone())

    def list_conversations(self, limit: int = 100) -> list[dict]:
        """The `limit` most recently updated conversations, newest first, without their messages."""
        if not isinstance(limit, int) or limit < 1:
            raise LLMLabError(f"list_conversations: limit must be a positive int, got {limit!r}")
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT * FROM conversations ORDER BY updated DESC, id DESC LIMIT ?", (limit,))
            return [_conversation(r) for r in rows]

    def get_conversation(self, cid: int) -> dict | None:
        """The conversation with its active messages in position order, or None."""
        with self._transaction(write=False) as db:
            row = db.execute("SELECT * FROM conversations WHERE id = ?", (cid,)).fetchone()
            if row is None:
                return None
            messages = self._messages(db, "m.conversation_id = ? AND m.active = 1", (cid,))
            return {**_conversation(row), "messages": messages}

    def rename_conversation(self, cid: int, title: str) -> dict | None:
        """Set the title; the updated conversation, or None for an unknown id."""
        if not isinstance(title, str):
            raise LLMLabError(f"rename_conversation: the title must be a string, got {type(title).__name__}")
        with self._transaction() as db:
            db.execute("UPDATE conversations SET title = ?, updated = ? WHERE id = ?", (title, time.time(), cid))
            row = db.execute("SELECT * FROM conversations WHERE id = ?", (cid,)).fetchone()
            return None if row is None else _conversation(row)

    def delete_conversation(self, cid: int) -> bool:
        """Delete a conversation with its messages, ratings, flags and comparisons; False if there was none."""
        with self._transaction() as db:
            return db.execute("DELETE FROM conversations WHERE id = ?", (cid,)).rowcount > 0

    # ------------------------------------------------------------------------------------------------ messages

    def _messages(self, db: sqlite3.Connection, where: str, args: tuple) -> list[dict]:
        """Message dicts (with rating and flags) of the messages matching `where`, in position order."""
        rows = db.execute(f"SELECT m.*, COALESCE(r.rating, 0) AS rating FROM messages m "
                          f"LEFT JOIN ratings r ON r.message_id = m.id WHERE {where} ORDER BY m.position", args)
        rows = rows.fetchall()
        flags = defaultdict(list)
        for f in db.execute(f"SELECT * FROM flags WHERE message_id IN (SELECT m.id FROM messages m WHERE {where}) "
                            f"ORDER BY id", args):
            flags[f["message_id"]].append({k: f[k] for k in ("reason", "correction", "created")})
        return [{"id": r["id"], "conversation_id": r["conversation_id"], "parent_id": r["parent_id"],
                 "position": r["position"], "role": r["role"], "content": r["content"],
                 "tool_calls": json.loads(r["tool_calls"]), "model": r["model"], "settings": json.loads(r["settings"]),
                 "active": bool(r["active"]), "rating": r["rating"], "flags": flags[r["id"]], "created": r["created"]}
                for r in rows]

    def _message(self, db: sqlite3.Connection, mid: int) -> dict:
        """The message dict of an existing message, else LLMLabError."""
        found = self._messages(db, "m.id = ?", (mid,))
        if not found:
            raise LLMLabError(f"no message {mid} in the feedback store {self.path}: it was deleted or never existed")
        return found[0]

    def _touch(self, db: sqlite3.Connection, cid: int) -> None:
        db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), cid))

    def _insert_message(self, db: sqlite3.Connection, cid: int, role: str, content: str, parent_id: int | None,
                        tool_calls: list[dict], model: str | None, settings: dict) -> int:
        position = db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM messages WHERE conversation_id = ?",
                              (cid,)).fetchone()[0]
        cur = db.execute(
            "INSERT INTO messages (conversation_id, parent_id, position, role, content, tool_calls, model, settings, "
            "active, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
            (cid, parent_id, position, role, content, json.dumps(tool_calls), model, json.dumps(settings), time.time()))
        self._touch(db, cid)
        return cur.lastrowid

    def add_message(self, cid: int, role: str, content: str, *, tool_calls: list[dict] | None = None,
                    model: str | None = None, settings: dict | None = None) -> dict:
        """Append a message (active) after the conversation's last one; its parent is the last active message,
        or that message's parent when both are assistant answers (an alternative answer to the same prompt)."""
        if role not in ROLES:
            raise LLMLabError(f"add_message: unknown role {role!r}: use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise LLMLabError(f"add_message: content must be a string, got {type(content).__name__}")
        calls = _check_tool_calls(tool_calls or [])
        if calls and role != "assistant":
            raise LLMLabError(f"add_message: only assistant messages carry tool_calls, not {role} messages")
        if model is not None and not isinstance(model, str):
            raise LLMLabError(f"add_message: model must be a string or None, got {type(model).__name__}")
        if not isinstance(settings or {}, dict):
            raise LLMLabError(f"add_message: settings must be a dict, got {type(settings).__name__}")
        try:
            json.dumps(settings or {})
        except (TypeError, ValueError) as e:
            raise LLMLabError(f"add_message: settings must be JSON-serializable ({e})") from None
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone() is None:
                raise LLMLabError(f"add_message: no conversation {cid}: create it first with create_conversation")
            last = db.execute("SELECT id, role, parent_id FROM messages WHERE conversation_id = ? AND active = 1 "
                              "ORDER BY position DESC LIMIT 1", (cid,)).fetchone()
            if last is None:
                parent = None
            elif role == "assistant" and last["role"] == "assistant":
                parent = last["parent_id"]
            else:
                parent = last["id"]
            mid = self._insert_message(db, cid, role, content, parent, calls, model, settings or {})
            return self._message(db, mid)

    def get_message(self, mid: int) -> dict | None:
        """The message dict (active or not), or None."""
        with self._transaction(write=False) as db:
            found = self._messages(db, "m.id = ?", (mid,))
            return found[0] if found else None

    def edit_message(self, mid: int, content: str) -> dict:
        """Replace a user message's text: the new text becomes a new active message in its place (same parent,
        returned, with a new id) and the old message and every later one become inactive, so answers to the old
        text keep their own prompt."""
        if not isinstance(content, str):
            raise LLMLabError(f"edit_message: content must be a string, got {type(content).__name__}")
        with self._transaction() as db:
            old = self._message(db, mid)
            if old["role"] != "user":
                raise LLMLabError(f"edit_message: message {mid} is a {old['role']} message: only user messages can be "
                                  f"edited (flag an answer with a correction instead)")
            db.execute("UPDATE messages SET active = 0 WHERE conversation_id = ? AND position >= ?",
                       (old["conversation_id"], old["position"]))
            new = self._insert_message(db, old["conversation_id"], "user", content, old["parent_id"], [], None, {})
            return self._message(db, new)

    def deactivate_after(self, cid: int, position: int) -> int:
        """Deactivate the conversation's messages with a larger position (kept for history); how many changed."""
        with self._transaction() as db:
            n = db.execute("UPDATE messages SET active = 0 WHERE conversation_id = ? AND position > ? AND active = 1",
                           (cid, position)).rowcount
            self._touch(db, cid)
            return n

    def deactivate_message(self, mid: int) -> dict:
        """Hide one message from the conversation (e.g. an answer about to be regenerated); the updated message."""
        with self._transaction() as db:
            msg = self._message(db, mid)
            db.execute("UPDATE messages SET active = 0 WHERE id = ?", (mid,))
            self._touch(db, msg["conversation_id"])
            return {**msg, "active": False}

    # ------------------------------------------------------------------------------------------------ feedback

    def rate(self, mid: int, rating: int) -> dict:
        """Rate an assistant message -1 (bad), 0 (no rating) or +1 (good); the updated message."""
        if isinstance(rating, bool) or rating not in RATINGS:
            raise LLMLabError(f"rate: the rating must be -1, 0 or 1, got {rating!r}")
        with self._transaction() as db:
            msg = self._message(db, mid)
            if msg["role"] != "assistant":
                raise LLMLabError(f"rate: message {mid} is a {msg['role']} message: only assistant answers are rated")
            db.execute("INSERT INTO ratings (message_id, rating, updated) VALUES (?, ?, ?) "
                       "ON CONFLICT (message_id) DO UPDATE SET rating = excluded.rating, updated = excluded.updated",
                       (mid, rating, time.time()))
            self._touch(db, msg["conversation_id"])
            return self._message(db, mid)

    def flag(self, mid: int, reason: str, correction: str | None = None) -> dict:
        """Flag an assistant message with a reason and optionally the answer it should have given (a blank
        correction counts as none); the updated message."""
        if not isinstance(reason, str) or not reason.strip():
            raise LLMLabError("flag: give a non-empty reason (e.g. 'wrong', 'unsafe', 'made up a fact')")
        if correction is not None and not isinstance(correction, str):
            raise LLMLabError(f"flag: the correction must be a string or None, got {type(correction).__name__}")
        correction = correction if correction and correction.strip() else None
        with self._transaction() as db:
            msg = self._message(db, mid)
            if msg["role"] != "assistant":
                raise LLMLabError(f"flag: message {mid} is a {msg['role']} message: only assistant answers are flagged")
            db.execute("INSERT INTO flags (message_id, reason, correction, created) VALUES (?, ?, ?, ?)",
                       (mid, reason.strip(), correction, time.time()))
            self._touch(db, msg["conversation_id"])
            return self._message(db, mid)

    def create_comparison(self, cid: int, mid_a: int, mid_b: int) -> dict:
        """Record two assistant answers of conversation `cid` to the same prompt, shown side by side."""
        if mid_a == mid_b:
            raise LLMLabError(f"create_comparison: compare two different messages, got {mid_a} twice")
        with self._transaction() as db:
            a, b = self._message(db, mid_a), self._message(db, mid_b)
            for m in (a, b):
                if m["conversation_id"] != cid or m["role"] != "assistant":
                    raise LLMLabError(f"create_comparison: message {m['id']} is not an assistant message of "
                                      f"conversation {cid}: compare two answers of that conversation")
            if a["parent_id"] != b["parent_id"]:
                raise LLMLabError(f"create_comparison: messages {mid_a} and {mid_b} answer different prompts: compare "
                                  f"two answers to the same message")
            cur = db.execute("INSERT INTO comparisons (conversation_id, message_a, message_b, chosen, created) "
                             "VALUES (?, ?, ?, NULL, ?)", (cid, mid_a, mid_b, time.time()))
            self._touch(db, cid)
            return _comparison(db.execute("SELECT * FROM comparisons WHERE id = ?", (cur.lastrowid,)).fetchone())

    def get_comparison(self, comparison_id: int) -> dict | None:
        with self._transaction(write=False) as db:
            row = db.execute("SELECT * FROM comparisons WHERE id = ?", (comparison_id,)).fetchone()
            return None if row is None else _comparison(row)

    def list_comparisons(self, cid: int) -> list[dict]:
        """The comparisons of conversation `cid`, oldest first."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT * FROM comparisons WHERE conversation_id = ? ORDER BY id", (cid,)).fetchall()
            return [_comparison(row) for row in rows]

    def choose(self, comparison_id: int, chosen_mid: int) -> dict:
        """Pick the better answer of a comparison: it becomes active and the other inactive, so the conversation
        continues with the chosen one. Choosing again changes the choice."""
        with self._transaction() as db:
            row = db.execute("SELECT * FROM comparisons WHERE id = ?", (comparison_id,)).fetchone()
            if row is None:
                raise LLMLabError(f"choose: no comparison {comparison_id}: create it with create_comparison")
            pair = (row["message_a"], row["message_b"])
            if chosen_mid not in pair:
                raise LLMLabError(f"choose: message {chosen_mid} is not in comparison {comparison_id}: choose "
                                  f"{pair[0]} or {pair[1]}")
            other = pair[1] if chosen_mid == pair[0] else pair[0]
            db.execute("UPDATE comparisons SET chosen = ? WHERE id = ?", (chosen_mid, comparison_id))
            db.execute("UPDATE messages SET active = (id = ?) WHERE id IN (?, ?)", (chosen_mid, chosen_mid, other))
            self._touch(db, row["conversation_id"])
            return _comparison(db.execute("SELECT * FROM comparisons WHERE id = ?", (comparison_id,)).fetchone())

    # -------------------------------------------------------------------------------------------------- export

    def snapshot(self) -> Snapshot:
        """Everything in the store, read in one transaction (a consistent view while the server writes)."""
        with self._transaction(write=False) as db:
            conversations = {r["id"]: _conversation(r) for r in db.execute("SELECT * FROM conversations ORDER BY id")}
            messages = {m["id"]: m for m in self._messages(db, "1 = 1", ())}
            comparisons = [_comparison(r) for r in db.execute("SELECT * FROM comparisons ORDER BY id")]
            flags = [dict(r) for r in db.execute("SELECT * FROM flags ORDER BY id")]
        return Snapshot(conversations, messages, comparisons, flags)
