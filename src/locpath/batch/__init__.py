"""`locpath batch`: every slide of an archive tiled, encoded, compressed and asked every question, in this process
(overlapping reading and encoding) or on a Ray cluster (Ray Data, one encoder actor per worker); resumable by
content hash, one record per slide, written atomically."""
