//! The reward model: Detoxify-style BERT / RoBERTa sequence classifiers (sigmoid per label), their
//! configuration and label sets, and scoring texts with them.

pub mod config;
pub mod model;
pub mod scorer;

pub use config::{Arch, ClassifierConfig};
pub use model::SequenceClassifier;
pub use scorer::{Classifier, sigmoid};
