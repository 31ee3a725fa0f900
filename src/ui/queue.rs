//! The job queue: what waits to run, in order, editable while the engine works.

use std::collections::VecDeque;

use egui::Ui;

use super::UiCommand;
use crate::worker::{Job, JobId};

/// Jobs waiting for the engine.
#[derive(Default)]
pub struct JobQueue {
    jobs: VecDeque<Job>,
}

impl JobQueue {
    /// Appends a job.
    pub fn push(&mut self, job: Job) {
        self.jobs.push_back(job);
    }

    /// Puts a job back at the front (it could not be started).
    pub fn push_front(&mut self, job: Job) {
        self.jobs.push_front(job);
    }

    /// Takes the next job.
    pub fn pop(&mut self) -> Option<Job> {
        self.jobs.pop_front()
    }

    /// Removes a job; false if it was not queued.
    pub fn remove(&mut self, id: JobId) -> bool {
        let before = self.jobs.len();
        self.jobs.retain(|job| job.id != id);
        self.jobs.len() != before
    }

    /// Moves a job `offset` places (negative: towards the front), clamped to the queue.
    pub fn shift(&mut self, id: JobId, offset: isize) {
        if let Some(from) = self.jobs.iter().position(|job| job.id == id) {
            let to = (from as isize + offset).clamp(0, self.jobs.len() as isize - 1) as usize;
            if let Some(job) = self.jobs.remove(from) {
                self.jobs.insert(to, job);
            }
        }
    }

    /// The jobs in order.
    pub fn iter(&self) -> impl Iterator<Item = &Job> {
        self.jobs.iter()
    }

    /// The ids in order.
    pub fn ids(&self) -> Vec<JobId> {
        self.jobs.iter().map(|job| job.id).collect()
    }

    /// Number of waiting jobs.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }
}

/// Draws the queue with move up/down and remove buttons.
pub fn queue_ui(ui: &mut Ui, queue: &JobQueue, commands: &mut Vec<UiCommand>) {
    ui.heading(format!("Queue ({})", queue.len()));
    if queue.is_empty() {
        ui.weak("Generate while a job runs to queue more.");
        return;
    }
    egui::ScrollArea::vertical().show(ui, |ui| {
        let count = queue.len();
        for (index, job) in queue.iter().enumerate() {
            let request = &job.request;
            let title = if request.prompt.is_empty() {
                "(empty prompt)".to_string()
            } else {
                request.prompt.clone()
            };
            // The prompt on its own line (cut short with an ellipsis), its buttons below.
            ui.add(egui::Label::new(format!("{}. {title}", index + 1)).truncate())
                .on_hover_text(format!(
                    "{}\nseed {}, {} steps, {}x{}",
                    request.prompt, request.seed, request.steps, request.width, request.height
                ));
            ui.horizontal(|ui| {
                if ui
                    .add_enabled(index > 0, egui::Button::new("Sooner").small())
                    .clicked()
                {
                    commands.push(UiCommand::MoveQueued(job.id, -1));
                }
                if ui
                    .add_enabled(index + 1 < count, egui::Button::new("Later").small())
                    .clicked()
                {
                    commands.push(UiCommand::MoveQueued(job.id, 1));
                }
                if ui.small_button("Remove").clicked() {
                    commands.push(UiCommand::RemoveQueued(job.id));
                }
            });
            ui.separator();
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    fn job(id: JobId) -> Job {
        Job {
            id,
            request: Default::default(),
            preview: Default::default(),
            cancel: Arc::new(AtomicBool::new(false)),
            image: None,
            hires: None,
            lora_folders: Vec::new(),
            embedding_folders: Vec::new(),
            vae_tiling: Default::default(),
        }
    }

    #[test]
    fn reorder_and_remove() {
        let mut queue = JobQueue::default();
        for id in 1..=4 {
            queue.push(job(id));
        }
        queue.shift(3, -1);
        assert_eq!(queue.ids(), vec![1, 3, 2, 4]);
        queue.shift(1, 10);
        assert_eq!(queue.ids(), vec![3, 2, 4, 1]);
        queue.shift(3, -5);
        assert_eq!(queue.ids(), vec![3, 2, 4, 1]);
        assert!(queue.remove(4));
        assert!(!queue.remove(4));
        assert_eq!(queue.pop().map(|j| j.id), Some(3));
        assert_eq!(queue.ids(), vec![2, 1]);
    }
}
