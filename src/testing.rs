//! Helpers for the library's unit tests.

/// Parses `argv` (the flags and positionals, without a program name) the way the CLI parses a
/// command whose options are the flattened `T`: what every option type's test of its
/// defaults and flags needs.
pub(crate) fn parse_args<T: clap::Args>(argv: &[&str]) -> Result<T, clap::Error> {
    #[derive(clap::Parser)]
    struct Cli<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    <Cli<T> as clap::Parser>::try_parse_from(std::iter::once("x").chain(argv.iter().copied())).map(|c| c.args)
}
