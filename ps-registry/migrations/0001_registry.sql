-- The model registry. One schema for SQLite and PostgreSQL, so it uses only
-- what both speak: TEXT and BIGINT columns, composite keys instead of
-- auto-increment, no booleans. Times are RFC 3339 UTC text (sortable).

-- A registered model: a name and the number its next version gets.
CREATE TABLE models (
    name         TEXT PRIMARY KEY,
    next_version BIGINT NOT NULL,
    created_at   TEXT NOT NULL,
    created_by   TEXT NOT NULL
);

-- One immutable version of a model: its artifact (content-addressed by
-- sha256 in the artifact directory), metrics and lineage.
CREATE TABLE versions (
    model          TEXT NOT NULL REFERENCES models (name),
    version        BIGINT NOT NULL,
    sha256         TEXT NOT NULL,
    size_bytes     BIGINT NOT NULL,
    metrics        TEXT NOT NULL,  -- JSON object: metric name -> number
    run_config     TEXT,           -- the run file (TOML) that trained it
    data_checksums TEXT NOT NULL,  -- JSON object: data file -> sha256
    source_run     TEXT,           -- the run folder it came from
    checkpoint     TEXT,           -- the checkpoint it came from
    parent_version BIGINT,         -- what it was fine-tuned or compressed from
    created_at     TEXT NOT NULL,
    created_by     TEXT NOT NULL,
    PRIMARY KEY (model, version),
    FOREIGN KEY (model, parent_version) REFERENCES versions (model, version)
);

-- Where each label (staging, production, free-form aliases) points now.
-- `moves` counts its audit entries: the last one has seq = moves.
CREATE TABLE labels (
    model   TEXT NOT NULL REFERENCES models (name),
    label   TEXT NOT NULL,
    version BIGINT NOT NULL,
    moves   BIGINT NOT NULL,
    PRIMARY KEY (model, label),
    FOREIGN KEY (model, version) REFERENCES versions (model, version)
);

-- Every move of every label, append-only: seq 1, 2, ... per label.
CREATE TABLE label_moves (
    model        TEXT NOT NULL,
    label        TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    action       TEXT NOT NULL,  -- promote | rollback
    from_version BIGINT,         -- NULL on the label's first move
    to_version   BIGINT NOT NULL,
    moved_at     TEXT NOT NULL,
    moved_by     TEXT NOT NULL,
    PRIMARY KEY (model, label, seq),
    FOREIGN KEY (model, label) REFERENCES labels (model, label),
    FOREIGN KEY (model, to_version) REFERENCES versions (model, version)
);
