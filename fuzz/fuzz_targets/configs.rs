//! Every component config from any JSON; a scheduler config that passes its check must build
//! every sampler without panicking.
#![no_main]

use atelier::engine::config::{
    CheckedConfig, ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig,
};
use atelier::schedulers::{SchedulerKind, SigmaSchedule};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&steps, json)) = data.split_first() else {
        return;
    };
    if let Ok(config) = serde_json::from_slice::<UNetConfig>(json) {
        let _ = config.check();
    }
    if let Ok(config) = serde_json::from_slice::<VaeConfig>(json) {
        let _ = config.check();
    }
    if let Ok(config) = serde_json::from_slice::<ClipTextConfig>(json) {
        let _ = config.check();
    }
    if let Ok(config) = serde_json::from_slice::<SchedulerConfig>(json)
        && config.check().is_ok()
    {
        for kind in SchedulerKind::ALL {
            for sigmas in SigmaSchedule::ALL {
                let _ = kind.build(&config, 1 + steps as usize % 64, *sigmas, 0.0);
            }
        }
    }
});
