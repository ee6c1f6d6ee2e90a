//! The layer stream: a reference checkpoint's tensors, resolved in every input checkpoint,
//! grouped into blocks and visited block by block with the next block prefetched on a
//! background thread and the finished block's pages released.
//!
//! Resident memory therefore stays at about two blocks (the active one and the incoming one)
//! across all inputs, whatever the model size.

use crossbeam_channel::bounded;

use super::dtype::FloatDType;
use super::layers::{BlockSpec, group_blocks};
use super::reader::{Checkpoint, TensorMeta};
use crate::error::{Error, Result};

/// One output tensor: where it is in the reference and in each input.
#[derive(Debug, Clone)]
pub struct StreamTensor {
    pub name: String,
    /// Index into the reference checkpoint's `tensors`.
    pub reference: usize,
    /// Index into each input checkpoint's `tensors`, in input order (`None` where a partial
    /// input lacks the tensor); empty for integer buffers, which come from the reference alone.
    pub inputs: Vec<Option<usize>>,
}

/// A block of tensors visited together.
#[derive(Debug, Clone)]
pub struct StreamBlock {
    pub spec: BlockSpec,
    pub tensors: Vec<StreamTensor>,
}

/// Blocks of tensors resolved across checkpoints, ready to be visited in order.
pub struct LayerStream<'a> {
    pub reference: &'a Checkpoint,
    pub inputs: Vec<&'a Checkpoint>,
    pub blocks: Vec<StreamBlock>,
    /// Input tensors that the reference does not have (ignored), per input: (input, name).
    pub ignored: Vec<(usize, String)>,
}

impl<'a> LayerStream<'a> {
    /// The dtype a merge of `t` comes out in when the config sets none: its inputs' when they
    /// agree, else float32, as PyTorch (so mergekit) promotes mixed float dtypes; `None` for a
    /// tensor that is not a float one.
    pub fn natural_dtype(&self, t: &StreamTensor) -> Option<FloatDType> {
        let first = self.reference.tensors[t.reference].float_dtype()?;
        let inputs = self.inputs.iter().zip(&t.inputs).filter_map(|(c, i)| c.tensors[(*i)?].float_dtype());
        let mixed = inputs.into_iter().any(|d| d != first);
        Some(if mixed { FloatDType::F32 } else { first })
    }

    /// Resolves every reference tensor in every input and checks shapes and dtypes, so that a
    /// bad input is reported before any output is written.
    pub fn plan(reference: &'a Checkpoint, inputs: Vec<&'a Checkpoint>) -> Result<Self> {
        Self::plan_with(reference, inputs, true)
    }

    /// [`Self::plan`] for inputs that may each lack some of the reference's tensors (a slices
    /// config's views: a slice with fewer sources leaves the later views without its layers);
    /// a tensor an input has must still agree with the reference.
    pub fn plan_partial(reference: &'a Checkpoint, inputs: Vec<&'a Checkpoint>) -> Result<Self> {
        Self::plan_with(reference, inputs, false)
    }

    fn plan_with(reference: &'a Checkpoint, inputs: Vec<&'a Checkpoint>, complete: bool) -> Result<Self> {
        let mut resolved: Vec<Vec<Option<usize>>> = Vec::with_capacity(reference.tensors.len());
        let mut used: Vec<Vec<bool>> = inputs.iter().map(|c| vec![false; c.tensors.len()]).collect();
        for t in &reference.tensors {
            let mut per_input = Vec::with_capacity(inputs.len());
            if t.float_dtype().is_none() {
                // A float symerge cannot compute with (F64, FP8) would be copied from the
                // reference like a buffer below: a merge that is the base, with exit code 0.
                if !t.is_integer() {
                    return Err(Error::UnsupportedDtype {
                        path: reference.file_of(t).to_path_buf(),
                        tensor: t.name.clone(),
                        dtype: format!("{:?}", t.dtype),
                    });
                }
                // Integer buffers (e.g. BERT's position ids) are copied from the reference and
                // never read from the inputs, which need not have them (recent `transformers`
                // versions no longer save them); one an input has must still agree.
                for (ii, input) in inputs.iter().enumerate() {
                    if let Some(m) = input.resolve(&t.name) {
                        check_compatible(t, m, input)?;
                        used[ii][input.tensor_index(&m.name)] = true;
                    }
                }
                resolved.push(per_input);
                continue;
            }
            for (ii, input) in inputs.iter().enumerate() {
                let Some(m) = input.resolve(&t.name) else {
                    if complete {
                        return Err(Error::MissingTensor {
                            path: input.path.clone(),
                            tensor: t.name.clone(),
                            base: reference.path.clone(),
                        });
                    }
                    per_input.push(None);
                    continue;
                };
                check_compatible(t, m, input)?;
                let idx = input.tensor_index(&m.name);
                used[ii][idx] = true;
                per_input.push(Some(idx));
            }
            resolved.push(per_input);
        }
        let ignored = used
            .iter()
            .enumerate()
            .flat_map(|(ii, u)| u.iter().enumerate().filter(|(_, used)| !**used).map(move |(ti, _)| (ii, ti)))
            .map(|(ii, ti)| (ii, inputs[ii].tensors[ti].name.clone()))
            .collect();

        let specs = group_blocks(reference.tensors.iter().map(|t| t.name.as_str()));
        let blocks = specs
            .into_iter()
            .map(|spec| {
                let tensors = spec
                    .tensors
                    .iter()
                    .map(|name| {
                        let r = reference.tensor_index(name);
                        StreamTensor { name: name.clone(), reference: r, inputs: resolved[r].clone() }
                    })
                    .collect();
                StreamBlock { spec, tensors }
            })
            .collect();
        Ok(LayerStream { reference, inputs, blocks, ignored })
    }

    /// Every (checkpoint, tensor) a block reads: reference first, then the inputs.
    fn block_tensors<'s>(&'s self, b: &'s StreamBlock) -> impl Iterator<Item = (&'a Checkpoint, &'a TensorMeta)> + 's {
        b.tensors.iter().flat_map(move |t| {
            std::iter::once((self.reference, &self.reference.tensors[t.reference]))
                .chain(self.inputs.iter().zip(&t.inputs).filter_map(|(c, i)| i.map(|i| (*c, &c.tensors[i]))))
        })
    }

    /// Bytes read from all inputs (and the reference when it is not an input) for a block.
    pub fn block_input_bytes(&self, b: &StreamBlock) -> u64 {
        self.block_tensors(b).map(|(_, t)| t.nbytes() as u64).sum()
    }

    /// Calls `f` on each block in order. A helper thread faults the next block's pages in while
    /// `f` works; after `f` returns, the block's pages are dropped from the resident set.
    pub fn for_each_block<F>(&self, mut f: F) -> Result<()>
    where
        F: FnMut(usize, &StreamBlock) -> Result<()>,
    {
        std::thread::scope(|scope| {
            // Rendezvous channel: the helper is at most one block ahead.
            let (tx, rx) = bounded::<usize>(0);
            scope.spawn(move || {
                for (i, b) in self.blocks.iter().enumerate() {
                    for (c, t) in self.block_tensors(b) {
                        c.populate(t);
                    }
                    if tx.send(i).is_err() {
                        return;
                    }
                }
            });
            for i in rx.iter() {
                let b = &self.blocks[i];
                f(i, b)?;
                for (c, t) in self.block_tensors(b) {
                    c.release(t);
                }
            }
            Ok(())
        })
    }
}

fn check_compatible(reference: &TensorMeta, input: &TensorMeta, ckpt: &Checkpoint) -> Result<()> {
    if reference.shape != input.shape {
        return Err(Error::ShapeMismatch {
            path: ckpt.file_of(input).to_path_buf(),
            tensor: input.name.clone(),
            got: input.shape.clone(),
            expected: reference.shape.clone(),
        });
    }
    let both_float = reference.float_dtype().is_some() && input.float_dtype().is_some();
    if !both_float && reference.dtype != input.dtype {
        return Err(Error::DtypeMismatch {
            path: ckpt.file_of(input).to_path_buf(),
            tensor: input.name.clone(),
            got: format!("{:?}", input.dtype),
            expected: format!("{:?}", reference.dtype),
        });
    }
    Ok(())
}
