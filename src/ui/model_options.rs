//! The model's options under the picker: a VAE in place of the baked-in one, what the model
//! predicts (single files do not always say it right), and whether its text encoders stay on
//! the CPU to save GPU memory, remembered per model.

use egui::Ui;

use super::UiCommand;
use super::settings::Settings;
use crate::engine::pipeline::ModelOverrides;
use crate::schedulers::Prediction;

/// "VAE: baked in [Choose…]" and "Predicts: auto/epsilon/v" for the current model; a change
/// reloads the model with it.
pub(super) fn model_options_ui(ui: &mut Ui, settings: &Settings, commands: &mut Vec<UiCommand>) {
    if settings.model.is_empty() {
        return;
    }
    let overrides = settings.overrides_for(&settings.model);
    let title = if overrides.is_empty() {
        "Model options".to_string()
    } else {
        "Model options (overridden)".to_string()
    };
    egui::CollapsingHeader::new(title)
        .id_salt("model-options")
        .show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.label("VAE");
                match overrides.vae_name() {
                    Some(name) => {
                        ui.label(name).on_hover_text(
                            overrides
                                .vae
                                .as_ref()
                                .map(|v| v.display().to_string())
                                .unwrap_or_default(),
                        );
                        if ui.button("Baked in").clicked() {
                            commands.push(UiCommand::SetModelOverrides(ModelOverrides {
                                vae: None,
                                ..overrides.clone()
                            }));
                        }
                    }
                    None => {
                        ui.weak("baked in");
                    }
                }
                if ui
                    .button("Choose…")
                    .on_hover_text("A VAE file (vae-ft-mse, sdxl-vae-fp16-fix, …) for this model")
                    .clicked()
                {
                    commands.push(UiCommand::ChooseVae);
                }
            });
            ui.horizontal(|ui| {
                ui.label("Text encoders");
                match &overrides.text_encoders {
                    Some(source) => {
                        let name = source
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_else(|| source.display().to_string());
                        ui.label(name).on_hover_text(source.display().to_string());
                        if ui.button("Baked in").clicked() {
                            commands.push(UiCommand::SetModelOverrides(ModelOverrides {
                                text_encoders: None,
                                ..overrides.clone()
                            }));
                        }
                    }
                    None => {
                        ui.weak("baked in");
                    }
                }
                if ui
                    .button("From…")
                    .on_hover_text(
                        "For a checkpoint without text encoders: a diffusers folder, or a \
                         checkpoint of the same family, to take them from",
                    )
                    .clicked()
                {
                    commands.push(UiCommand::ChooseTextEncoders);
                }
            });
            ui.horizontal(|ui| {
                let label = ui.label("Predicts");
                let name = |p: Option<Prediction>| match p {
                    None => "auto",
                    Some(Prediction::Epsilon) => "epsilon",
                    Some(Prediction::VPrediction) => "v",
                    Some(Prediction::Sample) => "sample",
                };
                let mut chosen = overrides.prediction;
                egui::ComboBox::from_id_salt("model-prediction")
                    .selected_text(name(chosen))
                    .show_ui(ui, |ui| {
                        for option in [
                            None,
                            Some(Prediction::Epsilon),
                            Some(Prediction::VPrediction),
                        ] {
                            ui.selectable_value(&mut chosen, option, name(option));
                        }
                    })
                    .response
                    .labelled_by(label.id)
                    .on_hover_text(
                        "auto: the model's config, a sidecar .yaml, or a guess from the weights",
                    );
                if chosen != overrides.prediction {
                    commands.push(UiCommand::SetModelOverrides(ModelOverrides {
                        prediction: chosen,
                        ..overrides.clone()
                    }));
                }
            });
            let mut on_cpu = overrides.text_encoders_on_cpu;
            if ui
                .checkbox(&mut on_cpu, "Text encoders on the CPU")
                .on_hover_text(
                    "When GPU memory is short (SDXL on an 8 GB card): the text encoders stay \
                     in main memory and run on the CPU, which saves their GPU memory (1.6 GB \
                     for SDXL) and costs a second or two of CPU time per prompt",
                )
                .changed()
            {
                commands.push(UiCommand::SetModelOverrides(ModelOverrides {
                    text_encoders_on_cpu: on_cpu,
                    ..overrides.clone()
                }));
            }
        });
}
