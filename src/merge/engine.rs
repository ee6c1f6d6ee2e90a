//! Which engine runs a merge: the `--device` rules every rank applies the same way.
//!
//! `cpu` runs the CPU engine. `auto` takes the GPU (the launcher's local rank's) when one is
//! usable and the config fits the GPU engine, else the CPU, saying why in one log line. `cuda`
//! insists: a config the GPU engine cannot run is an error, except a method without a GPU
//! kernel, which runs on the CPU with one warning.

use std::path::{Path, PathBuf};

use super::config::MergeConfig;
use super::executor::{CpuEngine, MergeOptions, MergeSummary, merge_with_in};
use super::mergekit_flags::MergekitFlags;
use crate::backend::Device;
use crate::backend::cuda::stream_merge::{CudaEngine, CudaOptions, no_kernel, unsupported};
use crate::backend::cuda::{Resolved, resolve};
use crate::dist::{Collective, ConnectOptions};
use crate::error::{Error, Result};
use crate::units::parse_size;

/// `symerge merge`'s arguments: the config, how to write ([`MergeOptions`]), which engine, and
/// the launcher's ranks to split the blocks over. `mergekit-yaml`'s command line works too:
/// `symerge merge CONFIG OUT --cuda --random-seed 1 ...` ([`MergekitFlags`]).
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("out").required(true).multiple(false)))]
pub struct MergeArgs {
    /// The merge config (mergekit's YAML format; paths relative to it).
    pub config: PathBuf,
    /// Output directory (written atomically: it appears only when complete).
    #[arg(short, long, group = "out")]
    pub output: Option<PathBuf>,
    /// The output directory given after the config, as `mergekit-yaml CONFIG OUT` takes it.
    #[arg(group = "out", value_name = "OUTPUT")]
    pub out_path: Option<PathBuf>,
    #[command(flatten)]
    pub opts: MergeOptions,
    /// Where the math runs: auto (a CUDA device if usable, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Device memory the GPU merge may use, e.g. 20GB (default: what is free, less 2 GB).
    /// When it holds every input, inputs stay resident on the device.
    #[arg(long, value_parser = parse_size)]
    pub device_mem: Option<u64>,
    #[command(flatten)]
    pub mergekit: MergekitFlags,
    /// Split the blocks over the launcher's ranks (each on GPU LOCAL_RANK with a CUDA
    /// device); rank 0 assembles the shards and the index.
    #[command(flatten)]
    pub dist: ConnectOptions,
}

impl MergeArgs {
    /// The defaults: [`MergeOptions::new`], `--device auto`, the GPU's free memory, one process
    /// unless a launcher says otherwise.
    pub fn new(config: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        let output = output.into();
        MergeArgs {
            config: config.into(),
            output: Some(output.clone()),
            out_path: None,
            opts: MergeOptions::new(output),
            device: Device::Auto,
            device_mem: None,
            mergekit: MergekitFlags::default(),
            dist: ConnectOptions::default(),
        }
    }

    /// The write options with the output directory however the command line gave it.
    pub fn options(&self) -> MergeOptions {
        let output = self.output.as_ref().or(self.out_path.as_ref()).unwrap_or(&self.opts.output);
        MergeOptions { output: output.clone(), ..self.opts.clone() }
    }

    /// Loads the config, joins the launcher's ranks and merges as this rank ([`merge_on`]).
    pub fn run(&self) -> Result<MergeSummary> {
        let device = self.mergekit.check(self.device)?;
        let opts = self.options();
        let cfg = MergeConfig::load(&self.config)?;
        let (n, method, out) = (cfg.models.len(), &cfg.method.name, opts.output.display());
        let base = if cfg.subtracted_base().is_some() { " + base" } else { "" };
        tracing::info!("merging {n} expert(s){base} with {method} into {out}");
        // Several ranks on a node: `auto` and `cuda` take the GPU of the local rank.
        let config = std::fs::read(&self.config).map_err(|e| Error::io(&self.config, e))?;
        let run = crate::dist::run_fingerprint(&format!("merge -o {out}"), &[&config]);
        let read = super::inputs::input_paths(&cfg);
        let inputs: Vec<&Path> = read.iter().map(PathBuf::as_path).chain([self.config.as_path()]).collect();
        self.dist.check_apart(&opts.output, &inputs)?;
        let (info, mut coll) = self.dist.connect_from_env(&run)?;
        merge_on(&cfg, &opts, device, self.device_mem, coll.as_mut()).map_err(|e| info.tag(e))
    }
}

/// Merges `config` on the engine `device` names, as one rank of `coll` (a rank that cannot
/// open its engine aborts the group, so no other rank waits for it); `device_mem` bounds the GPU
/// engine's memory.
pub fn merge_on(
    config: &MergeConfig,
    opts: &MergeOptions,
    device: Device,
    device_mem: Option<u64>,
    coll: &mut dyn Collective,
) -> Result<MergeSummary> {
    let engine = choose(config, device).inspect_err(|e| coll.abort(&e.to_string()))?;
    match engine {
        Resolved::Cpu { .. } => merge_with_in(config, opts, &mut CpuEngine, coll),
        Resolved::Cuda(gpu) => {
            let mut engine = CudaEngine::new(&gpu, CudaOptions { device_mem, ..Default::default() });
            merge_with_in(config, opts, &mut engine, coll)
        }
    }
}

/// The engine for `config` on `device` (see the module notes).
fn choose(config: &MergeConfig, device: Device) -> Result<Resolved> {
    match (device, unsupported(config)) {
        (Device::Auto, Some(why)) => {
            tracing::info!("--device auto: using the CPU ({why})");
            Ok(Resolved::Cpu { reason: Some(why) })
        }
        (Device::Cuda(_), Some(why)) if no_kernel(config).is_some() => {
            tracing::warn!("--device cuda: {why}; merging on the CPU");
            Ok(Resolved::Cpu { reason: Some(why) })
        }
        (Device::Cuda(_), Some(why)) => Err(Error::Invalid(format!("{why}; use --device cpu"))),
        _ => resolve(device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::FloatDType;
    use crate::testing::parse_args;

    #[test]
    fn cli_defaults_are_the_library_defaults() {
        let args: MergeArgs = parse_args(&["m.yml", "-o", "out"]).unwrap();
        let lib = MergeArgs::new("m.yml", "out");
        assert_eq!(format!("{:?}", args.options()), format!("{:?}", lib.options()));
        assert_eq!(format!("{:?}", (&args.device, &args.mergekit)), format!("{:?}", (&lib.device, &lib.mergekit)));
    }

    /// `mergekit-yaml CONFIG OUT` and its flags: the output after the config, `--cuda`, the
    /// write switches, mergekit's shard sizes; flags without effect pass, unsupported ones are
    /// refused naming the flag; `-o` and a second output, or none, are usage errors.
    #[test]
    fn a_mergekit_command_line_parses() {
        let argv = [
            "m.yml",
            "out",
            "--cuda",
            "--out-shard-size",
            "1B",
            "--random-seed",
            "42",
            "--allow-crimes",
            "--copy-tokenizer",
            "--no-copy-tokenizer",
            "--no-write-model-card",
            "--lazy-unpickle",
            "--lora-merge-cache",
            "/tmp/c",
            "--write-threads",
            "2",
            "--no-quiet",
        ];
        let args: MergeArgs = parse_args(&argv).unwrap();
        let opts = args.options();
        assert_eq!(opts.output, PathBuf::from("out"));
        assert_eq!(opts.max_shard_bytes, 1_000_000_000);
        assert_eq!(opts.random_seed, Some(42));
        assert!(opts.allow_crimes && !opts.copy_tokenizer && !opts.write_model_card);
        assert_eq!(args.mergekit.check(args.device).unwrap(), Device::Cuda(None));
        let later: MergeArgs = parse_args(&["m.yml", "out", "--no-copy-tokenizer", "--copy-tokenizer"]).unwrap();
        assert!(later.options().copy_tokenizer, "the later of the pair wins");
        let plain: MergeArgs = parse_args(&["m.yml", "out"]).unwrap();
        assert_eq!(plain.mergekit.check(Device::Cpu).unwrap(), Device::Cpu);
        let no_cuda: MergeArgs = parse_args(&["m.yml", "out", "--no-cuda"]).unwrap();
        assert_eq!(no_cuda.mergekit.check(no_cuda.device).unwrap(), Device::Cpu, "mergekit's default device");
        assert!(plain.options().copy_tokenizer && plain.options().write_model_card && !plain.options().allow_crimes);
        for (flag, value) in [
            ("--no-safe-serialization", None),
            ("--unsafe-truncate-embeddings", None),
            ("--lora-merge-dtype", Some("bf16")),
        ] {
            let mut argv = vec!["m.yml", "out", flag];
            argv.extend(value);
            let args: MergeArgs = parse_args(&argv).unwrap();
            let e = args.mergekit.check(Device::Auto).unwrap_err().to_string();
            assert!(e.starts_with(flag), "{e}");
        }
        let bad: [&[&str]; 4] = [
            &["m.yml", "out", "-o", "out2"],
            &["m.yml"],
            &["m.yml", "out", "--cuda", "--device", "cpu"],
            &["m.yml", "out", "--cuda", "--no-cuda"],
        ];
        for bad in bad {
            assert!(parse_args::<MergeArgs>(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_and_dtype_parse_under_their_flag_names() {
        let argv = ["m.yml", "-o", "o", "--out-shard-size", "2GiB", "--dtype", "float16", "--device-mem", "1GB"];
        let args: MergeArgs = parse_args(&argv).unwrap();
        let opts = &args.opts;
        assert_eq!(
            (opts.max_shard_bytes, opts.out_dtype, args.device_mem),
            (2 << 30, Some(FloatDType::F16), Some(1_000_000_000))
        );
        let bad = parse_args::<MergeArgs>(&["m.yml", "-o", "o", "--out-shard-size", "0"]);
        let e = bad.err().unwrap().to_string();
        assert!(e.contains("--out-shard-size") && e.contains("at least one byte"), "{e}");
    }
}
