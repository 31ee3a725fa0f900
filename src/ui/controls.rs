//! The left panel: model, prompts and every generation setting.

use egui::{RichText, Ui};

use super::settings::Settings;
use super::settings::{MODEL_PRESETS, size_presets};
use super::{InitImageView, ModelState, UiCommand};
use crate::engine::source::LoadProgress;
use crate::schedulers::{SchedulerKind, SigmaSchedule};

/// Draws the controls; actions go to `commands`, values are edited in place.
/// `model` says where the engine stands; the model field being typed is `model_input`.
pub fn controls_ui(
    ui: &mut Ui,
    settings: &mut Settings,
    model_input: &mut String,
    model: &ModelState,
    init_image: Option<&InitImageView>,
    models_scan: &crate::models_folders::ModelsScan,
    commands: &mut Vec<UiCommand>,
) {
    model_ui(ui, settings, model_input, model, models_scan, commands);
    ui.separator();
    prompts_ui(ui, settings, model);
    lora_picker_ui(ui, settings, &models_scan.loras);
    ui.separator();
    super::mode_controls::init_image_ui(ui, settings, init_image, commands);
    ui.separator();
    parameters_ui(ui, settings, model, commands);
    ui.add_space(4.0);
    egui::CollapsingHeader::new("Settings").show(ui, |ui| settings_ui(ui, settings, commands));
}

/// The Generate button, below the controls and always in view.
pub fn generate_button_ui(ui: &mut Ui, busy: bool, commands: &mut Vec<UiCommand>) {
    ui.add_space(6.0);
    let generate = egui::Button::new(RichText::new("Generate").heading())
        .min_size(egui::vec2(ui.available_width(), 36.0));
    let label = if busy {
        "Queue another (Ctrl+Enter)"
    } else {
        "Generate (Ctrl+Enter)"
    };
    if ui.add(generate).on_hover_text(label).clicked() {
        commands.push(UiCommand::Generate);
    }
    ui.add_space(6.0);
}

fn model_ui(
    ui: &mut Ui,
    settings: &mut Settings,
    model_input: &mut String,
    model: &ModelState,
    models_scan: &crate::models_folders::ModelsScan,
    commands: &mut Vec<UiCommand>,
) {
    let model_heading = ui.heading("Model");
    let bundled = settings.model == crate::demo_model::MODEL_ID;
    let current = match model {
        ModelState::Ready(_) | ModelState::Loading { .. } if bundled => {
            crate::demo_model::NAME.to_string()
        }
        ModelState::Ready(info) => info.name.clone(),
        ModelState::Loading { model, .. } | ModelState::Failed { model } => model.clone(),
        ModelState::Empty => "Choose a model…".into(),
    };
    ui.horizontal(|ui| {
        egui::ComboBox::from_id_salt("model-picker")
            .selected_text(current)
            .width(200.0)
            .height(520.0)
            .show_ui(ui, |ui| {
                for preset in MODEL_PRESETS {
                    if ui
                        .selectable_label(settings.model == preset.repo, preset.label)
                        .on_hover_text(preset.repo)
                        .clicked()
                    {
                        settings.steps = preset.steps;
                        settings.guidance = preset.guidance;
                        settings.width = preset.size;
                        settings.height = preset.size;
                        commands.push(UiCommand::LoadModel(preset.repo.into()));
                    }
                }
                let recent: Vec<String> = settings
                    .recent_models
                    .iter()
                    .filter(|m| !MODEL_PRESETS.iter().any(|p| p.repo == m.as_str()))
                    .cloned()
                    .collect();
                if !recent.is_empty() {
                    ui.separator();
                    ui.weak("Recent");
                    for model in recent {
                        if ui
                            .selectable_label(settings.model == model, &model)
                            .clicked()
                        {
                            commands.push(UiCommand::LoadModel(model));
                        }
                    }
                }
                checkpoints_ui(ui, settings, &models_scan.checkpoints, commands);
            })
            .response
            .labelled_by(model_heading.id);
        if ui
            .button("Folder…")
            .on_hover_text("A diffusers model folder")
            .clicked()
        {
            commands.push(UiCommand::OpenFolder);
        }
        if ui
            .button("File…")
            .on_hover_text("A single-file checkpoint (.safetensors), as A1111 and ComfyUI use")
            .clicked()
        {
            commands.push(UiCommand::OpenModelFile);
        }
    });
    ui.horizontal(|ui| {
        let field = egui::TextEdit::singleline(model_input)
            .hint_text("folder, .safetensors or owner/repo")
            .desired_width(262.0);
        let response = ui.add(field).on_hover_text(
            "A diffusers folder, a single-file checkpoint or a Hugging Face repo id",
        );
        let submitted = response.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        if (ui.button("Load").clicked() || submitted) && !model_input.trim().is_empty() {
            commands.push(UiCommand::LoadModel(model_input.trim().to_string()));
        }
    });
    if bundled {
        egui::CollapsingHeader::new("About Atelier Shapes")
            .default_open(true)
            .show(ui, |ui| {
                ui.label(RichText::new(crate::demo_model::ABOUT).small());
            });
    }
    match model {
        ModelState::Empty => {
            ui.weak("No model loaded.");
        }
        ModelState::Loading { progress, .. } => {
            ui.horizontal(|ui| {
                ui.spinner();
                match progress {
                    Some(LoadProgress::Downloading {
                        file,
                        bytes_done,
                        bytes_total,
                    }) => {
                        let fraction = if *bytes_total > 0 {
                            *bytes_done as f32 / *bytes_total as f32
                        } else {
                            0.0
                        };
                        ui.add(egui::ProgressBar::new(fraction).text(format!(
                            "{file}: {:.0} / {:.0} MB",
                            *bytes_done as f64 / 1e6,
                            *bytes_total as f64 / 1e6
                        )));
                    }
                    Some(LoadProgress::Loading { component }) => {
                        ui.label(format!("Loading {component}…"));
                    }
                    None => {
                        ui.label("Loading…");
                    }
                }
            });
        }
        ModelState::Ready(info) => {
            ui.label(format!(
                "{} · {} · {}",
                info.name,
                info.family.display_name(),
                info.device
            ));
        }
        ModelState::Failed { .. } => {
            ui.colored_label(ui.visuals().error_fg_color, "Could not load this model.");
        }
    }
    super::model_options::model_options_ui(ui, settings, commands);
}

fn prompts_ui(ui: &mut Ui, settings: &mut Settings, model: &ModelState) {
    let counter = match model {
        ModelState::Ready(info) => Some((info.token_counter.clone(), info.max_prompt_tokens)),
        _ => None,
    };
    for (label, hint, negative) in [
        ("Prompt", "What to draw", false),
        ("Negative prompt", "What to avoid", true),
    ] {
        let label_response = ui.label(label);
        let text = if negative {
            &mut settings.negative_prompt
        } else {
            &mut settings.prompt
        };
        let mut layouter = |ui: &Ui, buffer: &dyn egui::TextBuffer, wrap_width: f32| {
            let job =
                super::prompt_highlight::prompt_layout_job(buffer.as_str(), ui.style(), wrap_width);
            ui.fonts_mut(|fonts| fonts.layout_job(job))
        };
        let editor = egui::TextEdit::multiline(text)
            .hint_text(hint)
            .desired_rows(if negative { 2 } else { 4 })
            .desired_width(f32::INFINITY)
            .layouter(&mut layouter);
        ui.add(editor).labelled_by(label_response.id);
        if let Some((count, chunk)) = counter.as_ref().map(|(f, chunk)| (f(text), *chunk)) {
            ui.weak(token_summary(count, chunk));
        }
    }
}

/// The models folders' checkpoints in the model picker, with a search field: name, family,
/// variant and size; files Atelier does not run are listed greyed with the reason.
fn checkpoints_ui(
    ui: &mut Ui,
    settings: &Settings,
    checkpoints: &[crate::models_folders::CheckpointEntry],
    commands: &mut Vec<UiCommand>,
) {
    if checkpoints.is_empty() {
        return;
    }
    ui.separator();
    ui.weak("Models folders");
    let filter_id = egui::Id::unique("atelier-checkpoint-filter");
    let mut filter: String = ui.data_mut(|d| d.get_temp(filter_id).unwrap_or_default());
    ui.horizontal(|ui| {
        let label = ui.label("Search models");
        ui.add(
            egui::TextEdit::singleline(&mut filter)
                .hint_text("name or family")
                .desired_width(120.0),
        )
        .labelled_by(label.id)
        .on_hover_text("Filter by name or family (\"xl inpaint\")");
    });
    ui.data_mut(|d| d.insert_temp(filter_id, filter.clone()));
    let words: Vec<String> = filter.split_whitespace().map(str::to_lowercase).collect();
    for entry in checkpoints {
        let haystack = format!("{} {}", entry.name, entry.summary).to_lowercase();
        if !words.iter().all(|w| haystack.contains(w)) {
            continue;
        }
        let path = entry.path.display().to_string();
        let hover = match &entry.hash {
            Some(hash) => format!("{}\nhash {hash}", entry.summary),
            None => entry.summary.clone(),
        };
        let label = ui
            .add_enabled(
                entry.runs,
                egui::Button::selectable(settings.model == path, &entry.name),
            )
            .on_hover_text(&hover)
            .on_disabled_hover_text(&hover);
        if label.clicked() {
            commands.push(UiCommand::LoadModel(path));
        }
    }
}

/// "LoRA: Add…" — picking one appends A1111's `<lora:name:1>` tag to the prompt.
fn lora_picker_ui(ui: &mut Ui, settings: &mut Settings, lora_names: &[String]) {
    ui.horizontal(|ui| {
        let label = ui.label("LoRA");
        if lora_names.is_empty() {
            ui.weak("none found: add a models folder in Settings");
            return;
        }
        let mut picked = None;
        egui::ComboBox::from_id_salt("lora-picker")
            .selected_text("Add to the prompt…")
            .width(200.0)
            .height(400.0)
            .show_ui(ui, |ui| {
                for name in lora_names {
                    if ui.selectable_label(false, name).clicked() {
                        picked = Some(name.clone());
                    }
                }
            })
            .response
            .labelled_by(label.id)
            .on_hover_text("Inserts <lora:name:1> (edit the weight in the prompt)");
        if let Some(name) = picked {
            if !settings.prompt.is_empty() && !settings.prompt.ends_with(' ') {
                settings.prompt.push(' ');
            }
            settings.prompt.push_str(&format!("<lora:{name}:1>"));
        }
    });
}

/// "12 / 75 tokens", or with more than one chunk "92 / 150 tokens (2 chunks)", as A1111 counts
/// them: every chunk of `chunk` tokens is encoded on its own, nothing is dropped.
pub fn token_summary(count: usize, chunk: usize) -> String {
    let chunk = chunk.max(1);
    let chunks = count.max(1).div_ceil(chunk);
    if chunks > 1 {
        format!("{count} / {} tokens ({chunks} chunks)", chunks * chunk)
    } else {
        format!("{count} / {chunk} tokens")
    }
}

fn parameters_ui(
    ui: &mut Ui,
    settings: &mut Settings,
    model: &ModelState,
    commands: &mut Vec<UiCommand>,
) {
    egui::Grid::new("parameters")
        .num_columns(2)
        .spacing([8.0, 6.0])
        .show(ui, |ui| {
            let seed_label = ui.label("Seed");
            ui.horizontal(|ui| {
                ui.add(egui::DragValue::new(&mut settings.seed).range(0..=u64::from(u32::MAX)))
                    .labelled_by(seed_label.id)
                    .on_hover_text("The seed of the next image");
                if ui
                    .button("Random")
                    .on_hover_text("Draw a random seed")
                    .clicked()
                {
                    commands.push(UiCommand::RandomSeed);
                }
                ui.checkbox(&mut settings.seed_locked, "Lock")
                    .on_hover_text("Keep this seed; unlocked, every Generate draws a new one");
            });
            ui.end_row();

            let steps_label = ui.label("Steps");
            ui.add(egui::Slider::new(&mut settings.steps, 1..=150))
                .labelled_by(steps_label.id);
            ui.end_row();

            let guidance_label = ui.label("Guidance");
            ui.add(egui::Slider::new(&mut settings.guidance, 0.0..=20.0).step_by(0.5))
                .labelled_by(guidance_label.id)
                .on_hover_text("Classifier-free guidance; 0 or 1 turns it off (Turbo models)");
            ui.end_row();

            let size_label = ui.label("Size");
            ui.vertical(|ui| {
                let (family, native, multiple) = match model {
                    ModelState::Ready(info) => {
                        (Some(info.family), info.native_size, info.size_multiple)
                    }
                    _ => (None, None, 8),
                };
                egui::ComboBox::from_id_salt("size-presets")
                    .selected_text(format!("{} × {}", settings.width, settings.height))
                    .show_ui(ui, |ui| {
                        for (w, h) in size_presets(family, native) {
                            if ui
                                .selectable_label(
                                    (settings.width, settings.height) == (w, h),
                                    format!("{w} × {h}"),
                                )
                                .clicked()
                            {
                                settings.width = w;
                                settings.height = h;
                            }
                        }
                    })
                    .response
                    .labelled_by(size_label.id);
                ui.horizontal(|ui| {
                    let multiple = multiple.max(1);
                    ui.add(
                        egui::DragValue::new(&mut settings.width)
                            .range(multiple..=4096)
                            .speed(multiple as f64)
                            .prefix("W "),
                    );
                    ui.add(
                        egui::DragValue::new(&mut settings.height)
                            .range(multiple..=4096)
                            .speed(multiple as f64)
                            .prefix("H "),
                    );
                    settings.width = (settings.width / multiple).max(1) * multiple;
                    settings.height = (settings.height / multiple).max(1) * multiple;
                });
            });
            ui.end_row();

            let scheduler_label = ui.label("Scheduler");
            let current = SchedulerKind::parse(&settings.scheduler).unwrap_or(SchedulerKind::Euler);
            egui::ComboBox::from_id_salt("scheduler")
                .selected_text(current.display_name())
                .show_ui(ui, |ui| {
                    for kind in SchedulerKind::ALL {
                        if ui
                            .selectable_label(current == *kind, kind.display_name())
                            .clicked()
                        {
                            settings.scheduler = kind.id().into();
                        }
                    }
                })
                .response
                .labelled_by(scheduler_label.id);
            ui.end_row();

            let sigmas_label = ui.label("Sigmas");
            ui.add_enabled_ui(current.supports(SigmaSchedule::Karras), |ui| {
                egui::ComboBox::from_id_salt("sigma-schedule")
                    .selected_text(if current.supports(settings.sigma_schedule) {
                        settings.sigma_schedule.display_name()
                    } else {
                        SigmaSchedule::Default.display_name()
                    })
                    .show_ui(ui, |ui| {
                        for schedule in SigmaSchedule::ALL {
                            if current.supports(*schedule) {
                                ui.selectable_value(
                                    &mut settings.sigma_schedule,
                                    *schedule,
                                    schedule.display_name(),
                                );
                            }
                        }
                    })
                    .response
                    .labelled_by(sigmas_label.id)
                    .on_hover_text(
                        "How the noise levels are spaced (Karras: more steps at low noise)",
                    );
            });
            ui.end_row();

            if current == SchedulerKind::Ddim {
                let eta_label = ui.label("Eta");
                ui.add(egui::Slider::new(&mut settings.eta, 0.0..=1.0).fixed_decimals(2))
                    .labelled_by(eta_label.id)
                    .on_hover_text("0: deterministic DDIM; 1: as much fresh noise as DDPM");
                ui.end_row();
            }

            let batch_label = ui.label("Batch count");
            ui.add(egui::DragValue::new(&mut settings.batch_count).range(1..=32))
                .labelled_by(batch_label.id)
                .on_hover_text("Jobs to queue; their seeds follow one another");
            ui.end_row();
        });
}

fn settings_ui(ui: &mut Ui, settings: &mut Settings, commands: &mut Vec<UiCommand>) {
    ui.horizontal(|ui| {
        let device_label = ui.label("Device");
        let before = settings.device.clone();
        egui::ComboBox::from_id_salt("device")
            .selected_text(&settings.device)
            .show_ui(ui, |ui| {
                for device in ["auto", "cpu", "cuda", "metal"] {
                    ui.selectable_value(&mut settings.device, device.to_string(), device);
                }
            })
            .response
            .labelled_by(device_label.id);
        if settings.device != before && !settings.model.is_empty() {
            commands.push(UiCommand::LoadModel(settings.model.clone()));
        }
    });
    ui.horizontal(|ui| {
        let label = ui.label("Clip skip");
        ui.add(egui::DragValue::new(&mut settings.clip_skip).range(1..=12))
            .labelled_by(label.id)
            .on_hover_text(
                "A1111's \"CLIP stop at last layers\": 2 reads the text encoder one layer before its end (SD 1.x models)",
            );
    });
    ui.horizontal(|ui| {
        use crate::engine::vae_tiling::VaeTiling;
        let label = ui.label("VAE tiling");
        let name = |tiling: VaeTiling| match tiling {
            VaeTiling::Auto => "auto",
            VaeTiling::Always => "always",
            VaeTiling::Never => "never",
        };
        egui::ComboBox::from_id_salt("vae-tiling")
            .selected_text(name(settings.vae_tiling))
            .show_ui(ui, |ui| {
                for tiling in VaeTiling::ALL {
                    ui.selectable_value(&mut settings.vae_tiling, tiling, name(tiling));
                }
            })
            .response
            .labelled_by(label.id)
            .on_hover_text(
                "Decode (and encode) the image in tiles: the memory it needs stops growing with \
                 the image. auto: only images too large for one pass (hires fix at 2048x2048); \
                 always: also smaller ones, when GPU memory is short",
            );
    });
    ui.horizontal(|ui| {
        ui.label("Full VAE preview every");
        ui.add(egui::DragValue::new(&mut settings.vae_preview_every).range(0..=50));
        ui.label("steps (0: fast preview only)");
    });
    models_folders_ui(ui, settings, commands);
    ui.horizontal(|ui| {
        let library_label = ui.label("Library");
        ui.add(
            egui::TextEdit::singleline(&mut settings.library_dir)
                .hint_text("default data folder")
                .desired_width(170.0),
        )
        .labelled_by(library_label.id)
        .on_hover_text("The gallery's folder: every image is saved there as a PNG");
        if ui.button("Use").clicked() {
            commands.push(UiCommand::OpenLibrary);
        }
    });
}

/// Settings -> Models folders: A1111 or ComfyUI installations, or plain folders of files.
fn models_folders_ui(ui: &mut Ui, settings: &mut Settings, commands: &mut Vec<UiCommand>) {
    ui.label("Models folders").on_hover_text(
        "An A1111 or ComfyUI installation (or its models folder), or a folder of LoRAs: \
         <lora:name> tags and the LoRA picker find their files there",
    );
    let mut removed = None;
    for (index, folder) in settings.models_folders.iter().enumerate() {
        ui.horizontal(|ui| {
            ui.label(folder);
            if ui.small_button("Remove").clicked() {
                removed = Some(index);
            }
        });
    }
    if let Some(index) = removed {
        settings.models_folders.remove(index);
        commands.push(UiCommand::ScanModelsFolders);
    }
    ui.horizontal(|ui| {
        if ui.button("Add folder…").clicked() {
            commands.push(UiCommand::AddModelsFolder);
        }
        if ui.button("Rescan").clicked() {
            commands.push(UiCommand::ScanModelsFolders);
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_token_summary_counts_chunks() {
        assert_eq!(super::token_summary(0, 75), "0 / 75 tokens");
        assert_eq!(super::token_summary(75, 75), "75 / 75 tokens");
        assert_eq!(super::token_summary(92, 75), "92 / 150 tokens (2 chunks)");
    }
}
