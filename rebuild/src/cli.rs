//! The commands, as `main` runs them (and the tests' `e2e-rebuild`).

use clap::Parser;

use crate::config::{Cli, Command};
use crate::{build, compare, swap, topic, Ctx, RebuildError};

/// The whole program: parse, run, print the error and exit 2 when
/// refused (the operator's next step is in the message), 1 on a failure.
pub async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    usage_service_kit::telemetry::init(&cli.log);
    match run(&cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("usage-rebuild: {err}");
            std::process::ExitCode::from(match err {
                RebuildError::Refused(_) => 2,
                _ => 1,
            })
        }
    }
}

pub async fn run(cli: &Cli) -> Result<(), RebuildError> {
    let ctx = Ctx::from_cli(cli)?;
    match &cli.command {
        Command::Plan(args) => {
            let mut args = args.clone();
            args.dry_run = true;
            build::run(&ctx, &args).await
        }
        Command::Build(args) => build::run(&ctx, args).await,
        Command::Status => status(&ctx).await,
        Command::Compare(args) => {
            let (mut store, mut state) = swap::load(&ctx).await?;
            if !state.built() {
                return Err(RebuildError::refused(
                    "the build has not finished: run `usage-rebuild build`",
                ));
            }
            if state.swapped() {
                return Err(RebuildError::refused(
                    "swapped already: the shadow database holds the replaced tables now",
                ));
            }
            let prices = usage_processors::pricing::PriceTable::load(&ctx.live).await?;
            crate::catchup::to_live(
                &ctx,
                &mut state,
                &mut store,
                &prices,
                crate::catchup::Rollups::DailyOnly,
            )
            .await?;
            let (before, partitions) = topic::live_offsets(&ctx.kafka, &ctx.group).await?;
            let mut report = compare::compare(&ctx, &state, false).await?;
            let (after, _) = topic::live_offsets(&ctx.kafka, &ctx.group).await?;
            // Partitions the live processors wrote during the compare.
            let moved = after
                .iter()
                .filter(|(p, o)| before.get(p) != Some(o) || state.applied.get(p) != Some(o))
                .map(|(p, _)| *p)
                .collect();
            report.mark_in_flight(&moved, partitions);
            print!("{}", report.render(args.show));
            if let Some(path) = &args.json {
                std::fs::write(
                    path,
                    serde_json::to_vec_pretty(&report).map_err(std::io::Error::other)?,
                )?;
                println!("JSON report: {}", path.display());
            }
            if report.clean() {
                Ok(())
            } else {
                Err(RebuildError::refused(
                    "unexplained differences (listed above)",
                ))
            }
        }
        Command::Swap(args) => swap::swap(&ctx, args).await,
        Command::Rollback(args) => swap::rollback(&ctx, args).await,
        Command::Drop(args) => swap::drop_shadow(&ctx, args.force).await,
    }
}

async fn status(ctx: &Ctx) -> Result<(), RebuildError> {
    let fenced = swap::fenced(ctx).await?;
    let (_, state) = match swap::load(ctx).await {
        Ok(x) => x,
        Err(RebuildError::Refused(msg)) => {
            println!("{msg}");
            if fenced {
                println!("WARNING: the processors are fenced (an interrupted swap): `usage-rebuild drop` lifts it");
            }
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    println!("rebuild {} in `{}`", state.id, ctx.shadow_db);
    println!("  scope:   {}", state.scope.describe());
    println!("  source:  {:?}", state.source);
    println!("  started: {}", state.started_at);
    println!(
        "  phases:  {}",
        if state.phases_done.is_empty() {
            "none finished".to_string()
        } else {
            state.phases_done.join(", ")
        }
    );
    println!(
        "  stored:  {} events ({} copies and messages outside the scope skipped)",
        state.events_staged, state.events_skipped
    );
    let applied: Vec<String> = state
        .applied
        .iter()
        .map(|(p, o)| format!("{p}:{o}"))
        .collect();
    println!("  caught up to offsets {}", applied.join(" "));
    match &state.swap {
        None => println!("  not swapped"),
        Some(s) => match (s.swapped_at, s.rollback.as_ref().and_then(|r| r.done_at)) {
            (Some(at), Some(back)) => println!("  swapped at {at}, rolled back at {back}"),
            (Some(at), None) => println!(
                "  swapped at {at}; the replaced tables are kept until {}",
                s.keep_until.map_or(String::new(), |k| k.to_string())
            ),
            (None, _) => println!(
                "  a swap (attempt {}) did not finish: run `usage-rebuild swap` again",
                s.attempt
            ),
        },
    }
    if fenced {
        println!("  the processors are FENCED (a swap is running or was interrupted)");
    }
    Ok(())
}
