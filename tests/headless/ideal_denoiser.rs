//! Every sampler, driven by the ideal denoiser of known data, must land on the data's mean and
//! standard deviation at 25 steps (see `atelier::schedulers::quality` for the set-up: DDPM's
//! linear betas with trailing spacing, N(0.5, 0.8^2) and an even mixture of N(-1, 0.3^2) and
//! N(1.5, 0.5^2), 65,536 independent values per run).
//!
//! The tolerances have two parts.
//! - Statistical: with N independent samples the sample mean has standard error s / sqrt(N) and
//!   the sample std about s / sqrt(2N) (for the mixture, whose kurtosis is lower than a
//!   Gaussian's, this overstates it slightly). We allow 5 standard errors: a correct sampler fails
//!   by chance less than once in a million runs (and the seeds are fixed anyway).
//! - Discretisation: the samplers solve an ODE (or SDE) in 25 steps; their error falls with the
//!   step size at a rate set by their order. The mean of Gaussian data goes through every
//!   sampler's (affine) updates unbiased, so the mean gets no allowance beyond the statistical
//!   one. The spread does not:
//!   * first-order samplers (Euler, DDIM, Euler a, DDPM) lose std in proportion to the step,
//!     about C / n with C of 2 to 3.6 on this schedule (Euler 8 %, Euler a 14 % at n = 25):
//!     allowance 4 / n = 16 %;
//!   * second-order stochastic samplers (DPM2 a, DPM++ SDE, DPM++ 2M SDE, DPM++ 2S a) are
//!     second order in their drift but inject noise in a first-order way (weak order 1), and
//!     Karras sigmas make their first steps long: allowance 2 / n = 8 %;
//!   * deterministic samplers of order 2 and more (Heun, DPM2, LMS, PLMS, DPM++ 2M, UniPC,
//!     DEIS), also with Karras sigmas, whose long first steps dominate: 3 %;
//!   * LCM is driven by a denoiser that returns an exact posterior draw (what a perfect
//!     consistency model does), so it has no discretisation error at all: statistical part only.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use atelier::schedulers::quality::{DataDistribution, reference_config, sample_ideal};
use atelier::schedulers::{Sampler, SchedulerKind, SigmaSchedule};

const SAMPLES: usize = 65_536;
const STEPS: usize = 25;

/// The relative std allowance for discretisation (see the module comment).
fn std_allowance(kind: SchedulerKind) -> f64 {
    let n = STEPS as f64;
    match kind {
        SchedulerKind::Euler
        | SchedulerKind::Ddim
        | SchedulerKind::EulerA
        | SchedulerKind::Ddpm => 4.0 / n,
        SchedulerKind::Dpm2A
        | SchedulerKind::DpmPpSde
        | SchedulerKind::DpmPp2mSde
        | SchedulerKind::DpmPp2sA => 2.0 / n,
        SchedulerKind::Heun
        | SchedulerKind::Dpm2
        | SchedulerKind::Lms
        | SchedulerKind::Pndm
        | SchedulerKind::DpmPp2m
        | SchedulerKind::UniPc
        | SchedulerKind::Deis => 0.03,
        SchedulerKind::Lcm => 0.0,
    }
}

#[test]
fn every_sampler_reaches_the_data_mean_and_std_at_25_steps() {
    let config = reference_config();
    let n = SAMPLES as f64;
    let mut failures = Vec::new();
    for (name, data) in DataDistribution::standard_pair() {
        let (mu, s) = (data.mean(), data.std());
        let mean_tolerance = 5.0 * s / n.sqrt();
        for &kind in SchedulerKind::ALL {
            let std_tolerance = 5.0 / (2.0 * n).sqrt() + std_allowance(kind);
            for sigmas in [SigmaSchedule::Default, SigmaSchedule::Karras] {
                if !kind.supports(sigmas) {
                    continue;
                }
                let sampler = Sampler { kind, sigmas };
                let stats = sample_ideal(sampler, &config, STEPS, &data, SAMPLES, 1).unwrap();
                let mean_error = (stats.mean - mu).abs();
                let std_error = (stats.std - s).abs() / s;
                println!(
                    "{name:9} {:20} mean off by {mean_error:.4} (allowed {mean_tolerance:.4}), \
                     std by {:.2} % (allowed {:.2} %)",
                    sampler.id(),
                    100.0 * std_error,
                    100.0 * std_tolerance
                );
                if mean_error > mean_tolerance || std_error > std_tolerance {
                    failures.push(format!("{name} {}", sampler.id()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "off the data: {failures:?}");
}

/// The measure can fail: a sampler that stops five steps short of the end keeps noise.
#[test]
fn a_sampler_that_stops_early_is_caught() {
    let config = reference_config();
    let data = DataDistribution::gaussian(0.5, 0.8);
    let sampler = Sampler {
        kind: SchedulerKind::DpmPp2m,
        sigmas: SigmaSchedule::Default,
    };
    // The schedule of 25 steps, run for its first 20 only, ends at t = 199 of 1000.
    let full = sample_ideal(sampler, &config, STEPS, &data, SAMPLES, 1).unwrap();
    let truncated = atelier::schedulers::quality::sample_ideal_steps(
        sampler,
        &config,
        STEPS,
        STEPS - 5,
        &data,
        SAMPLES,
        1,
    )
    .unwrap();
    let allowed = 5.0 / (2.0 * SAMPLES as f64).sqrt() + std_allowance(sampler.kind);
    assert!((full.std - 0.8).abs() / 0.8 <= allowed);
    assert!(
        (truncated.std - 0.8).abs() / 0.8 > allowed,
        "std {} after 20 of 25 steps",
        truncated.std
    );
}
