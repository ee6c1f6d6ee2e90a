//! Test-time adaptation of the merge: SyMerge (Lambda jointly with one task-specific layer per
//! task, against the experts' cached soft labels) and AdaMerging (Lambda only, entropy).
//! So far: the Lambda table ([`lambda`]) and the optimizer ([`adam`]).

pub mod adam;
pub mod lambda;
