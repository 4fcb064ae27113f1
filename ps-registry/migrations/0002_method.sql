-- How a version was made from its parent (compression: "int8", pruning,
-- distillation); NULL for a version trained from scratch.
ALTER TABLE versions ADD COLUMN method TEXT;
