//! `symerge bench-cuda` (filled in below).
