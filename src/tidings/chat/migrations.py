"""The chat's schema as numbered migrations, one list per database.

At start-up each store applies the migrations its database has not yet had, in order,
in one transaction, under a lock that makes a second process starting at the same time
wait and then find them applied (SQLite: the write lock `BEGIN IMMEDIATE` takes;
PostgreSQL: a transaction-level advisory lock of the schema). `chat_schema_version` holds
one row per migration applied. Migration 1 is the schema the chat had before migrations
were numbered; its statements are all `IF NOT EXISTS`, so a database made by an earlier
version is adopted as it is (its data kept) and marked as at version 1.

A new migration is appended to both lists (never edit one that shipped); the two lists
describe the same tables, each in its database's types.
"""

from __future__ import annotations

__all__ = ["POSTGRES", "SQLITE", "VERSION_TABLE"]

VERSION_TABLE = "chat_schema_version"

# Migration 1: the tables as the chat had them before migrations were numbered, with
# each database's types filled in.
_TABLES_1 = """
CREATE TABLE IF NOT EXISTS chat_users (
    username      TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_sessions (
    sid        TEXT PRIMARY KEY,
    username   TEXT NOT NULL,
    expires_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_rooms (
    name       TEXT PRIMARY KEY,
    created_by TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_members (
    room     TEXT NOT NULL,
    username TEXT NOT NULL,
    PRIMARY KEY (room, username)
);
CREATE TABLE IF NOT EXISTS chat_dms (
    conv TEXT PRIMARY KEY,
    a    TEXT NOT NULL,
    b    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chat_dms_a ON chat_dms (a);
CREATE INDEX IF NOT EXISTS chat_dms_b ON chat_dms (b);
CREATE TABLE IF NOT EXISTS chat_messages (
    id         {serial},
    conv       TEXT NOT NULL,
    sender     TEXT NOT NULL,
    content    TEXT NOT NULL,
    created_at TEXT NOT NULL,
    edited_at  TEXT
);
CREATE INDEX IF NOT EXISTS chat_messages_conv ON chat_messages (conv, id);
CREATE TABLE IF NOT EXISTS chat_reads (
    username  TEXT NOT NULL,
    conv      TEXT NOT NULL,
    last_read {bigint} NOT NULL,
    PRIMARY KEY (username, conv)
);
CREATE TABLE IF NOT EXISTS chat_tasks (
    id         TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    room       TEXT NOT NULL,
    format     TEXT NOT NULL,
    state      TEXT NOT NULL,
    percent    INTEGER NOT NULL DEFAULT 0,
    step       TEXT NOT NULL DEFAULT '',
    result     {blob},
    error      TEXT,
    created_at TEXT NOT NULL{task_order}
);
CREATE TABLE IF NOT EXISTS chat_replies (
    id       {bigint} PRIMARY KEY,
    asker    TEXT NOT NULL,
    reply_to {bigint},
    state    TEXT NOT NULL,
    note     TEXT
);
CREATE TABLE IF NOT EXISTS chat_outbox (
    {outbox},
    topic TEXT NOT NULL,
    data  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_state (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
"""

_SQLITE_1 = _TABLES_1.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL",
                             bigint="INTEGER", blob="BLOB", task_order="",
                             outbox="seq   INTEGER PRIMARY KEY AUTOINCREMENT")

# PostgreSQL's outbox rows get their `seq` when they are *sequenced* (`pg_store.py`), not
# when they are written: `chat_emit` writes an operation's updates at its end, with no
# lock, and NOTIFYs the relay only when the relay sleeps (it holds the idle key, which
# every writer otherwise takes shared until its commit). `chat_sequence` numbers the rows
# committed and not yet numbered, in `id` order, after the last number given; callers
# hold `chat_order` (a table with no rows, locked EXCLUSIVE: the lock takes no snapshot,
# so a REPEATABLE READ transaction can take it before its snapshot).
_POSTGRES_1 = _TABLES_1.format(
    serial="BIGSERIAL PRIMARY KEY", real="DOUBLE PRECISION", bigint="BIGINT", blob="BYTEA",
    # PostgreSQL has no rowid: the order tasks were created in.
    task_order=",\n    n          BIGSERIAL",
    outbox="id    BIGSERIAL PRIMARY KEY,\n    seq   BIGINT UNIQUE",
) + """;
CREATE INDEX IF NOT EXISTS chat_outbox_unsequenced ON chat_outbox (id) WHERE seq IS NULL;
CREATE TABLE IF NOT EXISTS chat_order ();
INSERT INTO chat_state VALUES ('sequenced', '0') ON CONFLICT DO NOTHING;
CREATE OR REPLACE FUNCTION chat_emit(idle_key BIGINT, channel TEXT, topics TEXT[],
                                     datas TEXT[]) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO chat_outbox (topic, data) SELECT * FROM unnest(topics, datas);
    IF NOT pg_try_advisory_xact_lock_shared(idle_key) THEN
        PERFORM pg_notify(channel, '');
    END IF;
END
$fn$;
CREATE OR REPLACE FUNCTION chat_sequence() RETURNS BIGINT
LANGUAGE plpgsql AS $fn$
DECLARE
    base  BIGINT;
    added BIGINT;
BEGIN
    LOCK TABLE chat_order IN EXCLUSIVE MODE;
    SELECT CAST(value AS BIGINT) INTO base FROM chat_state WHERE name = 'sequenced';
    UPDATE chat_outbox o SET seq = base + n.rank
      FROM (SELECT id, row_number() OVER (ORDER BY id) AS rank
              FROM chat_outbox WHERE seq IS NULL) n
     WHERE o.id = n.id;
    GET DIAGNOSTICS added = ROW_COUNT;
    IF added > 0 THEN
        UPDATE chat_state SET value = CAST(base + added AS TEXT) WHERE name = 'sequenced';
    END IF;
    RETURN base + added;
END
$fn$
"""

# Migration 2: what the processes on one PostgreSQL schema share (`cluster.py`): who is
# alive, who is online where, presence as last announced, who runs which task, and the
# rate limits' hits. (Earlier versions created these tables as the cluster started; all
# `IF NOT EXISTS`, so a schema that has them is adopted.) SQLite has one process: nothing.
_POSTGRES_2 = """CREATE TABLE IF NOT EXISTS chat_cluster_processes (
    process    TEXT PRIMARY KEY,
    host       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    seen_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS chat_cluster_presence (
    process    TEXT NOT NULL REFERENCES chat_cluster_processes ON DELETE CASCADE,
    connection BIGINT NOT NULL,
    username   TEXT NOT NULL,
    rooms      TEXT[] NOT NULL,
    PRIMARY KEY (process, connection)
);
CREATE TABLE IF NOT EXISTS chat_cluster_announced (
    room   TEXT PRIMARY KEY,
    online TEXT[] NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_cluster_claims (
    kind    TEXT NOT NULL,
    item    TEXT NOT NULL,
    process TEXT NOT NULL REFERENCES chat_cluster_processes ON DELETE CASCADE,
    PRIMARY KEY (kind, item)
);
CREATE TABLE IF NOT EXISTS chat_cluster_hits (
    key        TEXT NOT NULL,
    at         DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS chat_cluster_hits_key_at ON chat_cluster_hits (key, at);
CREATE OR REPLACE FUNCTION chat_cluster_hit(k TEXT, lim INTEGER, window_s DOUBLE PRECISION)
RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    now_s  DOUBLE PRECISION := extract(epoch FROM clock_timestamp());
    oldest DOUBLE PRECISION;  -- the lim-th newest hit in the window, if there are lim
BEGIN
    -- One key's hits one at a time, so two processes cannot both take the last slot.
    PERFORM pg_advisory_xact_lock(hashtext('chat_cluster_hit'), hashtext(k));
    SELECT at INTO oldest FROM chat_cluster_hits
        WHERE key = k AND at > now_s - window_s ORDER BY at DESC OFFSET lim - 1 LIMIT 1;
    IF oldest IS NULL THEN
        INSERT INTO chat_cluster_hits VALUES (k, now_s, now_s + window_s);
        RETURN 0;
    END IF;
    RETURN greatest(1, ceil(oldest + window_s - now_s))::INTEGER;
END $$;
"""
_SQLITE_2 = ""

# Migration 3: the relay's step and a message posted, one round trip each (a post
# checks its author's session too, when the caller has not lately: `p_sid`).
# `chat_relay_step(done, after, lim)`: what `ChatStore.relay_done(done)` and then
# `outbox_after(after, lim)` run as two transactions, in one call (one commit, not two).
# `chat_post_many`: room messages posted together, each as `chat_post` posts it, one
# answer each in order (`ChatStore._post_in_rooms`).
# `chat_post`: a message posted in one round trip (`ChatStore.post` on PostgreSQL, for a
# message that mentions nobody): the checks, the rate limit's hit, the message, the
# author's read mark and its `message.created` update, as `ChatStore._post` runs them
# statement by statement, in one call that is its own transaction. The update's JSON is
# made in Python (`events.message_created_around_id`), all but the id the insert takes.
# A refused post writes nothing. SQLite runs in-process: nothing.
_POSTGRES_3 = """CREATE OR REPLACE FUNCTION chat_post(
    idle_key BIGINT, channel TEXT, p_sid TEXT, p_now DOUBLE PRECISION, p_conv TEXT,
    p_room TEXT, p_other TEXT, p_dm_a TEXT, p_dm_b TEXT, p_sender TEXT, p_content TEXT,
    p_created_at TEXT, hit_key TEXT, hit_limit INTEGER, hit_window DOUBLE PRECISION,
    p_topic TEXT, data_head TEXT, data_tail TEXT, OUT status TEXT, OUT value BIGINT)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_sid IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM chat_sessions
            WHERE sid = p_sid AND username = p_sender AND expires_at > p_now) THEN
        status := 'no session';
        RETURN;
    END IF;
    IF p_room IS NOT NULL THEN
        IF NOT EXISTS (SELECT 1 FROM chat_rooms WHERE name = p_room) THEN
            status := 'no room';
            RETURN;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM chat_members
                       WHERE room = p_room AND username = p_sender) THEN
            status := 'not a member';
            RETURN;
        END IF;
    ELSIF NOT EXISTS (SELECT 1 FROM chat_users WHERE username = p_other) THEN
        status := 'no user';
        RETURN;
    END IF;
    IF hit_key IS NOT NULL THEN
        value := chat_cluster_hit(hit_key, hit_limit, hit_window);
        IF value > 0 THEN
            status := 'rate limited';
            RETURN;
        END IF;
    END IF;
    IF p_room IS NULL THEN
        INSERT INTO chat_dms VALUES (p_conv, p_dm_a, p_dm_b) ON CONFLICT DO NOTHING;
    END IF;
    INSERT INTO chat_messages (conv, sender, content, created_at)
        VALUES (p_conv, p_sender, p_content, p_created_at) RETURNING id INTO value;
    INSERT INTO chat_reads VALUES (p_sender, p_conv, value)
        ON CONFLICT (username, conv) DO UPDATE SET last_read = excluded.last_read
        WHERE excluded.last_read > chat_reads.last_read;
    PERFORM chat_emit(idle_key, channel, ARRAY[p_topic], ARRAY[data_head || value || data_tail]);
    status := 'posted';
END $$;
CREATE OR REPLACE FUNCTION chat_post_many(
    idle_key BIGINT, channel TEXT, sids TEXT[], nows DOUBLE PRECISION[], convs TEXT[],
    rooms TEXT[], senders TEXT[], contents TEXT[], created TEXT[], hit_keys TEXT[],
    hit_limits INTEGER[], hit_windows DOUBLE PRECISION[], topics TEXT[], heads TEXT[],
    tails TEXT[])
RETURNS TABLE (status TEXT, value BIGINT) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. coalesce(array_length(convs, 1), 0) LOOP
        SELECT p.status, p.value INTO status, value
          FROM chat_post(idle_key, channel, sids[i], nows[i], convs[i], rooms[i], NULL,
                         NULL, NULL, senders[i], contents[i], created[i], hit_keys[i],
                         hit_limits[i], hit_windows[i], topics[i], heads[i], tails[i]) p;
        RETURN NEXT;
    END LOOP;
END $$;
CREATE OR REPLACE FUNCTION chat_relay_step(done BIGINT, after BIGINT, lim INTEGER)
RETURNS TABLE (seq BIGINT, topic TEXT, data TEXT) LANGUAGE plpgsql AS $$
BEGIN
    IF done IS NOT NULL THEN
        DELETE FROM chat_outbox o WHERE o.seq <= done;
        UPDATE chat_state SET value = CAST(done AS TEXT) WHERE name = 'cursor';
    END IF;
    PERFORM chat_sequence();  -- number what has committed since
    RETURN QUERY SELECT o.seq, o.topic, o.data FROM chat_outbox o
        WHERE o.seq > after ORDER BY o.seq LIMIT lim;
END $$;
"""
_SQLITE_3 = ""

# Migration 4: the rate limit's check costs the same however many hits a key has in its
# window. Migration 2 found the lim-th newest hit by walking the key's hits on (key, at),
# up to `lim` of them (a user posting 40 messages a second under a lifted limit: 400 heap
# fetches per post, a fifth of a core at 2,000 posts a second). Now a key's hits are
# numbered 1, 2, 3, ... as they are taken (under the key's lock); the kept hits are always
# the newest (retention deletes the expired, the oldest), so the lim-th newest is the one
# numbered `newest - lim + 1`: two index probes. Hits taken before are numbered here.
# And the relay's numbering of the outbox reads by index (a quarter of the relay's
# PostgreSQL CPU at 2,000 messages a second was a sequential scan under a hash join).
_POSTGRES_4 = """ALTER TABLE chat_cluster_hits ADD COLUMN IF NOT EXISTS n BIGINT;
UPDATE chat_cluster_hits h SET n = r.n
  FROM (SELECT ctid AS row_id, row_number() OVER (PARTITION BY key ORDER BY at) AS n
          FROM chat_cluster_hits) r
 WHERE h.ctid = r.row_id AND h.n IS NULL;
CREATE INDEX IF NOT EXISTS chat_cluster_hits_key_n ON chat_cluster_hits (key, n);
DROP INDEX IF EXISTS chat_cluster_hits_key_at;
CREATE OR REPLACE FUNCTION chat_cluster_hit(k TEXT, lim INTEGER, window_s DOUBLE PRECISION)
RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    now_s  DOUBLE PRECISION := extract(epoch FROM clock_timestamp());
    newest BIGINT;            -- the number of the key's newest hit
    oldest DOUBLE PRECISION;  -- the lim-th newest hit, if it is kept
BEGIN
    -- One key's hits one at a time, so two processes cannot both take the last slot.
    PERFORM pg_advisory_xact_lock(hashtext('chat_cluster_hit'), hashtext(k));
    SELECT max(n) INTO newest FROM chat_cluster_hits WHERE key = k;
    IF newest >= lim THEN
        SELECT at INTO oldest FROM chat_cluster_hits WHERE key = k AND n = newest - lim + 1;
        IF oldest > now_s - window_s THEN
            RETURN greatest(1, ceil(oldest + window_s - now_s))::INTEGER;
        END IF;
    END IF;
    INSERT INTO chat_cluster_hits (key, at, expires_at, n)
        VALUES (k, now_s, now_s + window_s, coalesce(newest, 0) + 1);
    RETURN 0;
END $$;
-- The relay's numbering joined the unnumbered rows to the outbox by a hash join over a
-- scan of the whole table, dead rows included (its plan made while the outbox was
-- small): by the primary key instead.
ALTER FUNCTION chat_sequence() SET enable_seqscan = off;
"""
_SQLITE_4 = ""

# Migration n is item n-1: a script each (SQLite's are run statement by statement, split
# at `;`; PostgreSQL runs a script as one).
SQLITE: list[str] = [_SQLITE_1, _SQLITE_2, _SQLITE_3, _SQLITE_4]
POSTGRES: list[str] = [_POSTGRES_1, _POSTGRES_2, _POSTGRES_3, _POSTGRES_4]
