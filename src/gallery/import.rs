//! Reading the metadata other tools write (`../shared/docs/metadata.md`): ComfyUI's node graph
//! and InvokeAI's JSON. (AUTOMATIC1111's `parameters` lives in `metadata.rs`.)

use serde_json::Value;

use super::record::{ImageMetadata, MetadataSource};
use crate::schedulers::{Sampler, SchedulerKind, SigmaSchedule};

/// Our sampler for ComfyUI's `sampler_name` and `scheduler` (`dpmpp_2m`, `karras`).
pub fn sampler_from_comfyui(sampler_name: &str, scheduler: &str) -> Option<Sampler> {
    let kind = match sampler_name {
        "euler" => SchedulerKind::Euler,
        "euler_ancestral" => SchedulerKind::EulerA,
        "heun" => SchedulerKind::Heun,
        "dpm_2" => SchedulerKind::Dpm2,
        "dpm_2_ancestral" => SchedulerKind::Dpm2A,
        "lms" => SchedulerKind::Lms,
        "dpmpp_2s_ancestral" => SchedulerKind::DpmPp2sA,
        "dpmpp_sde" | "dpmpp_sde_gpu" => SchedulerKind::DpmPpSde,
        "dpmpp_2m" => SchedulerKind::DpmPp2m,
        "dpmpp_2m_sde" | "dpmpp_2m_sde_gpu" => SchedulerKind::DpmPp2mSde,
        "ddim" => SchedulerKind::Ddim,
        "ddpm" => SchedulerKind::Ddpm,
        "uni_pc" | "uni_pc_bh2" => SchedulerKind::UniPc,
        "deis" => SchedulerKind::Deis,
        "lcm" => SchedulerKind::Lcm,
        _ => return None,
    };
    let sigmas = match scheduler {
        "karras" => SigmaSchedule::Karras,
        "exponential" => SigmaSchedule::Exponential,
        _ => SigmaSchedule::Default,
    };
    Some(Sampler {
        kind,
        sigmas: if kind.supports(sigmas) {
            sigmas
        } else {
            SigmaSchedule::Default
        },
    })
}

/// Our sampler for InvokeAI's scheduler names (`dpmpp_2m_k` is DPM++ 2M Karras).
pub fn sampler_from_invokeai(name: &str) -> Option<Sampler> {
    let (base, karras) = match name.strip_suffix("_k") {
        Some(base) => (base, true),
        None => (name, false),
    };
    let kind = match base {
        "ddim" => SchedulerKind::Ddim,
        "ddpm" => SchedulerKind::Ddpm,
        "deis" => SchedulerKind::Deis,
        "lms" => SchedulerKind::Lms,
        "pndm" => SchedulerKind::Pndm,
        "heun" => SchedulerKind::Heun,
        "euler" => SchedulerKind::Euler,
        "euler_a" => SchedulerKind::EulerA,
        "kdpm_2" => SchedulerKind::Dpm2,
        "kdpm_2_a" => SchedulerKind::Dpm2A,
        "dpmpp_2s" => SchedulerKind::DpmPp2sA,
        "dpmpp_2m" => SchedulerKind::DpmPp2m,
        "dpmpp_2m_sde" => SchedulerKind::DpmPp2mSde,
        "dpmpp_sde" => SchedulerKind::DpmPpSde,
        "unipc" => SchedulerKind::UniPc,
        "lcm" => SchedulerKind::Lcm,
        _ => return None,
    };
    let sigmas = if karras && kind.supports(SigmaSchedule::Karras) {
        SigmaSchedule::Karras
    } else {
        SigmaSchedule::Default
    };
    Some(Sampler { kind, sigmas })
}

/// Follows a ComfyUI link (`["6", 0]`) to its node.
fn linked<'a>(graph: &'a Value, link: &Value) -> Option<&'a Value> {
    let id = link.as_array()?.first()?;
    let key = match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    graph.get(key)
}

/// The text of the prompt node a conditioning link leads to (through a few pass-through nodes).
fn prompt_text(graph: &Value, link: &Value, depth: usize) -> Option<String> {
    let node = linked(graph, link)?;
    let inputs = node.get("inputs")?;
    for key in ["text", "text_g", "prompt"] {
        if let Some(text) = inputs.get(key).and_then(Value::as_str) {
            return Some(text.to_string());
        }
    }
    if depth == 0 {
        return None;
    }
    [
        "conditioning",
        "conditioning_1",
        "positive",
        "conditioning_to",
    ]
    .iter()
    .find_map(|key| prompt_text(graph, inputs.get(*key)?, depth - 1))
}

/// The checkpoint a model link leads to (through LoRA loaders and the like).
fn checkpoint_name(graph: &Value, link: &Value, depth: usize) -> Option<String> {
    let inputs = linked(graph, link)?.get("inputs")?;
    for key in ["ckpt_name", "unet_name", "model_name"] {
        if let Some(name) = inputs.get(key).and_then(Value::as_str) {
            return Some(name.to_string());
        }
    }
    if depth == 0 {
        return None;
    }
    checkpoint_name(graph, inputs.get("model")?, depth - 1)
}

/// Reads ComfyUI's `prompt` chunk (the executed node graph): the first KSampler's seed, steps,
/// cfg and sampler, its prompts, latent size and checkpoint. `None` if it is not such a graph.
pub fn from_comfyui(graph_json: &str) -> Option<ImageMetadata> {
    let graph: Value = serde_json::from_str(graph_json).ok()?;
    let nodes = graph.as_object()?;
    let mut samplers: Vec<(&String, &Value)> = nodes
        .iter()
        .filter(|(_, node)| {
            node.get("class_type")
                .and_then(Value::as_str)
                .is_some_and(|c| c.starts_with("KSampler"))
        })
        .collect();
    samplers.sort_by_key(|(id, _)| id.parse::<u64>().unwrap_or(u64::MAX));
    let (_, sampler) = samplers.first()?;
    let inputs = sampler.get("inputs")?;
    let text = |key: &str| {
        inputs
            .get(key)
            .and_then(|link| prompt_text(&graph, link, 4))
            .unwrap_or_default()
    };
    let (width, height) = inputs
        .get("latent_image")
        .and_then(|link| linked(&graph, link))
        .and_then(|node| node.get("inputs"))
        .map(|latent| {
            let side = |key: &str| latent.get(key).and_then(Value::as_u64).unwrap_or(0) as u32;
            (side("width"), side("height"))
        })
        .unwrap_or((0, 0));
    let sampler_name = inputs
        .get("sampler_name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let schedule = inputs
        .get("scheduler")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let scheduler = sampler_from_comfyui(sampler_name, schedule)
        .map(|s| s.id())
        .unwrap_or_else(|| sampler_name.to_string());
    Some(ImageMetadata {
        prompt: text("positive"),
        negative_prompt: text("negative"),
        model: inputs
            .get("model")
            .and_then(|link| checkpoint_name(&graph, link, 6))
            .unwrap_or_default(),
        scheduler,
        seed: inputs
            .get("seed")
            .or_else(|| inputs.get("noise_seed"))
            .and_then(Value::as_u64),
        steps: inputs
            .get("steps")
            .and_then(Value::as_u64)
            .map(|s| s as usize),
        guidance: inputs.get("cfg").and_then(Value::as_f64),
        width,
        height,
        app_version: "ComfyUI".into(),
        source: MetadataSource::ComfyUi,
        ..Default::default()
    })
}

/// Reads InvokeAI's `invokeai_metadata` chunk. `None` if it is not such JSON.
pub fn from_invokeai(json: &str) -> Option<ImageMetadata> {
    let value: Value = serde_json::from_str(json).ok()?;
    let object = value.as_object()?;
    let text = |key: &str| {
        object
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    if !object.contains_key("positive_prompt") && !object.contains_key("seed") {
        return None;
    }
    let scheduler_name = text("scheduler");
    let model = match object.get("model") {
        Some(Value::String(name)) => name.clone(),
        Some(Value::Object(model)) => model
            .get("name")
            .or_else(|| model.get("model_name"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    };
    let model_hash = match object.get("model") {
        Some(Value::Object(model)) => model
            .get("hash")
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    };
    Some(ImageMetadata {
        prompt: text("positive_prompt"),
        negative_prompt: text("negative_prompt"),
        model,
        model_hash,
        scheduler: sampler_from_invokeai(&scheduler_name)
            .map(|s| s.id())
            .unwrap_or(scheduler_name),
        seed: object.get("seed").and_then(Value::as_u64),
        steps: object
            .get("steps")
            .and_then(Value::as_u64)
            .map(|s| s as usize),
        guidance: object.get("cfg_scale").and_then(Value::as_f64),
        width: object.get("width").and_then(Value::as_u64).unwrap_or(0) as u32,
        height: object.get("height").and_then(Value::as_u64).unwrap_or(0) as u32,
        app_version: object
            .get("app_version")
            .and_then(Value::as_str)
            .map(|v| format!("InvokeAI {v}"))
            .unwrap_or_else(|| "InvokeAI".into()),
        source: MetadataSource::InvokeAi,
        ..Default::default()
    })
}
