//! What every model family shares: a model is a chain of blocks (an embedding, its layers, a
//! head), each with its own parameter map keyed by Hugging Face names. A family brings its three
//! parts ([`EmbeddingPart`], [`LayerPart`], [`HeadPart`]: forward, backward, the tensors it reads
//! by row) and its batch; its block is `Part<E, L, H>`, whose [`ChainBlock`] dispatch is written
//! once here, as are loading the parameters, running the chain, saving each block's input and the
//! reverse sweep of the backward. Adaptation drives any [`ChainBlock`] the same way.

use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

use super::{Param, Params};

/// A lookup table's name and the rows (sorted, unique) a batch reads from it.
pub type TableRows = (String, Vec<u32>);

/// One block of a family's chain.
pub trait ChainBlock<B: Backend>: Clone {
    /// The family's uploaded batch.
    type Batch;
    /// Forward internals a backward can reuse instead of recomputing them.
    type Internals: Send;
    /// `embeddings`, a layer's prefix (`encoder.layer.3`, `model.layers.3`) or `head`: the
    /// layer-map names used elsewhere.
    fn name(&self) -> String;
    /// Full tensor names and shapes, in checkpoint order.
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)>;
    /// The block's output; `input` is the previous block's output (`None` for the first).
    fn forward(&self, be: &B, p: &Params<B>, batch: &Self::Batch, input: Option<&B::Buf>) -> Result<B::Buf>;
    /// [`Self::forward`] plus its internals, when the block has any worth keeping.
    fn forward_keeping(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &Self::Batch,
        input: Option<&B::Buf>,
    ) -> Result<(B::Buf, Option<Self::Internals>)>;
    /// f32 elements the internals hold.
    fn internals_len(be: &B, internals: &Self::Internals) -> usize;
    /// The tensors the block reads only by row lookups (embedding tables), with the rows `batch`
    /// reads: adaptation merges only those rows, and only they carry gradient.
    fn lookup_rows(&self, batch: &Self::Batch) -> Vec<TableRows>;
    /// `(dL/d input, dL/d params)` from the saved input, the kept internals (recomputed when
    /// `None`) and the output gradient.
    fn backward(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &Self::Batch,
        input: Option<&B::Buf>,
        kept: Option<Self::Internals>,
        grad_out: &B::Buf,
    ) -> Result<(Option<B::Buf>, Params<B>)>;
}

/// The inputs each block saw during a training forward: all the backward needs.
pub struct Saved<B: Backend> {
    inputs: Vec<Option<B::Buf>>,
}

/// Each block's parameters read from `ck` as f32 (aligned with `blocks`), those of the first
/// `skip` blocks left empty: adaptation streams those from the checkpoints itself.
pub fn load_params<B: Backend, K: ChainBlock<B>>(
    be: &B,
    ck: &Checkpoint,
    blocks: &[K],
    skip: usize,
) -> Result<Vec<Params<B>>> {
    let mut params = Vec::with_capacity(blocks.len());
    for (i, block) in blocks.iter().enumerate() {
        let mut p = Params::new();
        for (name, shape) in block.param_shapes().into_iter().filter(|_| i >= skip) {
            let buf = load_tensor(be, ck, &name, &shape)?;
            p.insert(name, Param { shape, buf });
        }
        params.push(p);
    }
    Ok(params)
}

/// Names of buffers a checkpoint may store that no model reads as weights.
const BUFFER_SUFFIXES: [&str; 4] = ["position_ids", "rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias"];

/// The stored tensors none of the model's parameter `names` reads (resolved through the
/// checkpoint's wrapper prefixes), buffers and what `ignored` accepts left out: what
/// transformers lists as unexpected weights.
fn unread_tensors(
    ck: &Checkpoint,
    names: impl IntoIterator<Item = String>,
    ignored: impl Fn(&str) -> bool,
) -> Vec<&str> {
    let read: std::collections::HashSet<&str> =
        names.into_iter().filter_map(|n| ck.resolve(&n).map(|t| t.name.as_str())).collect();
    ck.tensors
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| !read.contains(n) && !BUFFER_SUFFIXES.iter().any(|b| n.ends_with(b)) && !ignored(n))
        .collect()
}

/// Logs, once, the stored tensors none of the model's parameter `names` reads (a pretraining
/// head, another architecture's tensors under a familiar prefix), except buffers and what
/// `ignored` accepts: they are ignored, as transformers ignores them, but a user loading the
/// wrong checkpoint should hear of it. `what` names the model in the message.
pub fn warn_unread(
    ck: &Checkpoint,
    names: impl IntoIterator<Item = String>,
    ignored: impl Fn(&str) -> bool,
    what: &str,
) {
    let unread = unread_tensors(ck, names, ignored);
    if unread.is_empty() {
        return;
    }
    let shown: Vec<&str> = unread.iter().take(5).copied().collect();
    let more =
        if unread.len() > shown.len() { format!(" and {} more", unread.len() - shown.len()) } else { String::new() };
    tracing::warn!(
        "{}: {} stored tensor(s) are not read by {what} and are ignored: {}{more}",
        ck.path.display(),
        unread.len(),
        shown.join(", ")
    );
}

/// Reads one tensor as f32, checking its shape against what `config.json` implies and refusing
/// NaN/Inf (naming the element).
pub(super) fn load_tensor<B: Backend>(be: &B, ck: &Checkpoint, name: &str, shape: &[usize]) -> Result<B::Buf> {
    let t = ck.stored_shaped(name, shape)?;
    let mut values = vec![0f32; t.numel()];
    t.decode_into(0, &mut values);
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { path: t.file, tensor: t.name, index: i, value: values[i] });
    }
    be.upload(&values)
}

/// A parameter by name, from the first block that holds it.
pub fn param<'a, B: Backend>(params: &'a [Params<B>], name: &str) -> Option<&'a Param<B>> {
    params.iter().find_map(|p| p.get(name))
}

/// Replaces a parameter's values (same shape) in every block that holds it (both copies of a
/// tied embedding).
pub fn set_param<B: Backend>(be: &B, params: &mut [Params<B>], name: &str, values: &[f32]) -> Result<()> {
    let mut found = false;
    for p in params.iter_mut().filter_map(|p| p.get_mut(name)) {
        let n: usize = p.shape.iter().product();
        if values.len() != n {
            return Err(Error::Invalid(format!(
                "parameter `{name}` has shape {:?} ({n} values), got {} values",
                p.shape,
                values.len()
            )));
        }
        p.buf = be.upload(values)?;
        found = true;
    }
    if found { Ok(()) } else { Err(Error::Invalid(format!("the model has no parameter `{name}`"))) }
}

/// Updates a parameter where it lives: `update` changes its first holder's buffer in place and
/// every other holder (the second copy of a tied embedding) gets a device copy of the result.
pub fn update_param<B: Backend>(
    be: &B,
    params: &mut [Params<B>],
    name: &str,
    update: impl FnOnce(&mut B::Buf) -> Result<()>,
) -> Result<()> {
    let mut holders = params.iter_mut().filter_map(|p| p.get_mut(name));
    let first = holders.next().ok_or_else(|| Error::Invalid(format!("the model has no parameter `{name}`")))?;
    update(&mut first.buf)?;
    for other in holders {
        other.buf = be.copy(&first.buf)?;
    }
    Ok(())
}

/// The output of `blocks` run in order (inference: nothing is kept).
pub fn forward<B: Backend, K: ChainBlock<B>>(
    be: &B,
    blocks: &[K],
    params: &[Params<B>],
    batch: &K::Batch,
) -> Result<B::Buf> {
    let mut x: Option<B::Buf> = None;
    for (block, p) in blocks.iter().zip(params) {
        x = Some(block.forward(be, p, batch, x.as_ref())?);
    }
    x.ok_or_else(|| Error::Invalid("the model has no blocks".into()))
}

/// [`forward`] plus each block's input, for [`backward`].
pub fn forward_saving<B: Backend, K: ChainBlock<B>>(
    be: &B,
    blocks: &[K],
    params: &[Params<B>],
    batch: &K::Batch,
) -> Result<(B::Buf, Saved<B>)> {
    let mut inputs = Vec::with_capacity(blocks.len());
    let mut x: Option<B::Buf> = None;
    for (block, p) in blocks.iter().zip(params) {
        let y = block.forward(be, p, batch, x.as_ref())?;
        inputs.push(x.replace(y));
    }
    let out = x.ok_or_else(|| Error::Invalid("the model has no blocks".into()))?;
    Ok((out, Saved { inputs }))
}

/// Gradients of every block's parameters (aligned with `blocks`) given the gradient of the
/// chain's output. Blocks run in reverse, each recomputing its internals from its saved input,
/// which is freed as soon as the block is done.
pub fn backward<B: Backend, K: ChainBlock<B>>(
    be: &B,
    blocks: &[K],
    params: &[Params<B>],
    batch: &K::Batch,
    saved: Saved<B>,
    dout: &B::Buf,
) -> Result<Vec<Params<B>>> {
    let mut inputs = saved.inputs;
    if inputs.len() != blocks.len() {
        return Err(Error::Invalid("saved activations do not belong to this model".into()));
    }
    let mut grads = Vec::with_capacity(blocks.len());
    let mut dy: Option<B::Buf> = None;
    for i in (0..blocks.len()).rev() {
        let input = inputs.pop().flatten();
        let (dx, g) = blocks[i].backward(be, &params[i], batch, input.as_ref(), None, dy.as_ref().unwrap_or(dout))?;
        grads.push(g);
        dy = dx;
    }
    grads.reverse();
    Ok(grads)
}

/// One block parameter's buffer, or an error naming it.
pub(super) fn param_buf<'a, B: Backend>(p: &'a Params<B>, name: &str) -> Result<&'a B::Buf> {
    p.get(name)
        .map(|t| &t.buf)
        .ok_or_else(|| Error::Invalid(format!("parameter `{name}` is missing from the block's parameters")))
}

/// The previous block's output, which every block but the first needs.
fn need_input<T>(input: Option<&T>, block: impl FnOnce() -> String) -> Result<&T> {
    input.ok_or_else(|| Error::Invalid(format!("block `{}` needs the previous block's output", block())))
}

/// The three kinds of block every family's chain is made of: an embedding, its layers, a head. A
/// family brings one type per kind ([`EmbeddingPart`], [`LayerPart`], [`HeadPart`]) and names its
/// block `Part<ItsEmbedding, ItsLayer, ItsHead>`; the [`ChainBlock`] dispatch is written here once.
#[derive(Debug, Clone)]
pub enum Part<E, L, H> {
    Embedding(E),
    Layer(L),
    Head(H),
}

/// A part's tensors, known without a backend.
pub trait PartTensors {
    /// Full tensor names and shapes, in checkpoint order.
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)>;
}

/// The first block: table lookups of the batch's ids, so it has no input and no input gradient.
pub trait EmbeddingPart<B: Backend>: PartTensors + Clone {
    type Batch;
    fn forward(&self, be: &B, p: &Params<B>, batch: &Self::Batch) -> Result<B::Buf>;
    /// The tables' gradients.
    fn backward(&self, be: &B, p: &Params<B>, batch: &Self::Batch, dy: &B::Buf) -> Result<Params<B>>;
    /// The tables and the rows `batch` reads (see [`ChainBlock::lookup_rows`]).
    fn lookup_rows(&self, batch: &Self::Batch) -> Vec<TableRows>;
}

/// A layer's name in the layer map, known without a backend.
pub trait LayerName {
    /// The layer's prefix (`encoder.layer.3`, `model.layers.3`, `transformer.h.3`).
    fn block_name(&self) -> String;
}

/// A layer: the only part worth keeping internals for (the embedding and the head are cheap to
/// recompute).
pub trait LayerPart<B: Backend>: PartTensors + LayerName + Clone {
    type Batch;
    type Internals: Send;
    /// The output and the internals a later [`Self::backward`] can reuse.
    fn forward_keeping(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &Self::Batch,
        x: &B::Buf,
    ) -> Result<(B::Buf, Self::Internals)>;
    fn forward(&self, be: &B, p: &Params<B>, batch: &Self::Batch, x: &B::Buf) -> Result<B::Buf> {
        Ok(self.forward_keeping(be, p, batch, x)?.0)
    }
    /// f32 elements the internals hold.
    fn internals_len(be: &B, internals: &Self::Internals) -> usize;
    /// `(dL/dx, dL/d params)`; the internals are recomputed from `x` unless `kept` has them.
    fn backward(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &Self::Batch,
        x: &B::Buf,
        kept: Option<Self::Internals>,
        dy: &B::Buf,
    ) -> Result<(B::Buf, Params<B>)>;
}

/// The last block: the final hidden states to the chain's output (logits).
pub trait HeadPart<B: Backend>: PartTensors + Clone {
    type Batch;
    fn forward(&self, be: &B, p: &Params<B>, batch: &Self::Batch, x: &B::Buf) -> Result<B::Buf>;
    /// `(dL/dx, dL/d params)`.
    fn backward(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &Self::Batch,
        x: &B::Buf,
        dy: &B::Buf,
    ) -> Result<(B::Buf, Params<B>)>;
}

impl<E: PartTensors, L: PartTensors + LayerName, H: PartTensors> Part<E, L, H> {
    /// `embeddings`, the layer's prefix or `head`: the layer-map names used elsewhere.
    pub fn name(&self) -> String {
        match self {
            Part::Embedding(_) => "embeddings".into(),
            Part::Layer(l) => l.block_name(),
            Part::Head(_) => "head".into(),
        }
    }

    /// Full tensor names and shapes, in checkpoint order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Part::Embedding(e) => e.param_shapes(),
            Part::Layer(l) => l.param_shapes(),
            Part::Head(h) => h.param_shapes(),
        }
    }
}

impl<B, E, L, H> ChainBlock<B> for Part<E, L, H>
where
    B: Backend,
    E: EmbeddingPart<B>,
    L: LayerPart<B, Batch = E::Batch>,
    H: HeadPart<B, Batch = E::Batch>,
{
    type Batch = E::Batch;
    type Internals = L::Internals;

    fn name(&self) -> String {
        Part::name(self)
    }

    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        Part::param_shapes(self)
    }

    fn forward(&self, be: &B, p: &Params<B>, batch: &E::Batch, input: Option<&B::Buf>) -> Result<B::Buf> {
        match self {
            Part::Embedding(e) => e.forward(be, p, batch),
            Part::Layer(l) => l.forward(be, p, batch, need_input(input, || l.block_name())?),
            Part::Head(h) => h.forward(be, p, batch, need_input(input, || "head".into())?),
        }
    }

    fn forward_keeping(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &E::Batch,
        input: Option<&B::Buf>,
    ) -> Result<(B::Buf, Option<L::Internals>)> {
        match self {
            Part::Layer(l) => {
                let (y, kept) = l.forward_keeping(be, p, batch, need_input(input, || l.block_name())?)?;
                Ok((y, Some(kept)))
            }
            _ => Ok((self.forward(be, p, batch, input)?, None)),
        }
    }

    fn internals_len(be: &B, internals: &L::Internals) -> usize {
        L::internals_len(be, internals)
    }

    fn lookup_rows(&self, batch: &E::Batch) -> Vec<TableRows> {
        match self {
            Part::Embedding(e) => e.lookup_rows(batch),
            _ => Vec::new(),
        }
    }

    fn backward(
        &self,
        be: &B,
        p: &Params<B>,
        batch: &E::Batch,
        input: Option<&B::Buf>,
        kept: Option<L::Internals>,
        grad_out: &B::Buf,
    ) -> Result<(Option<B::Buf>, Params<B>)> {
        let (dx, g) = match self {
            Part::Embedding(e) => return Ok((None, e.backward(be, p, batch, grad_out)?)),
            Part::Layer(l) => l.backward(be, p, batch, need_input(input, || l.block_name())?, kept, grad_out)?,
            Part::Head(h) => h.backward(be, p, batch, need_input(input, || "head".into())?, grad_out)?,
        };
        Ok((Some(dx), g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    fn block(entries: &[(&str, Vec<f32>)]) -> Params<Cpu> {
        entries.iter().map(|(n, v)| (n.to_string(), Param { shape: vec![v.len()], buf: v.clone() })).collect()
    }

    /// A tied weight is updated once, in its first holder, and the other holder gets the result;
    /// other parameters are untouched; an unknown name is an error naming it.
    #[test]
    fn update_param_reaches_every_holder() {
        let mut params = vec![
            block(&[("emb", vec![1.0, 2.0]), ("a", vec![5.0])]),
            block(&[("emb", vec![1.0, 2.0]), ("b", vec![7.0])]),
        ];
        let mut calls = 0;
        update_param(&Cpu, &mut params, "emb", |p| {
            calls += 1;
            p.iter_mut().for_each(|x| *x *= 10.0);
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 1);
        assert_eq!((params[0]["emb"].buf.clone(), params[1]["emb"].buf.clone()), (vec![10.0, 20.0], vec![10.0, 20.0]));
        assert_eq!((params[0]["a"].buf[0], params[1]["b"].buf[0]), (5.0, 7.0));
        let e = update_param(&Cpu, &mut params, "nope", |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("`nope`"), "{e}");
    }
}
