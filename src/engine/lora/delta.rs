//! The weight change of one module, as kohya's `networks/lora.py`, PEFT and LyCORIS'
//! `functional/{loha,lokr}.py` define it (alpha / rank scaling included, the user's multiplier
//! not).

use candle_core::{DType, Device, Tensor};

use super::{LoraKind, LoraModule};
use crate::engine::error::{EngineError, Result};

fn matrix(t: &Tensor, device: &Device) -> Result<Tensor> {
    let rows = t.dim(0)?;
    Ok(t.to_device(device)?
        .to_dtype(DType::F32)?
        .reshape((rows, ()))?)
}

/// `kron(a, b)` for `a` `(p, q)` and `b` `(r, s, *k)`: `(p r, q s, *k)`.
fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (p, q) = a.dims2()?;
    let dims = b.dims().to_vec();
    let (r, s) = (dims[0], dims[1]);
    let rest: usize = dims[2..].iter().product();
    let a = a.reshape((p, 1, q, 1, 1))?;
    let b = b.reshape((1, r, 1, s, rest))?;
    let product = a.broadcast_mul(&b)?;
    let mut shape = vec![p * r, q * s];
    shape.extend_from_slice(&dims[2..]);
    Ok(product.reshape(shape)?)
}

impl LoraModule {
    /// How many values the module changes.
    fn rank_and_delta(&self, device: &Device) -> Result<(Option<usize>, Tensor)> {
        Ok(match &self.kind {
            LoraKind::LowRank { down, up } => {
                let rank = down.dim(0)?;
                let up = matrix(up, device)?;
                if up.dim(1)? != rank {
                    return Err(EngineError::InvalidParameter(format!(
                        "{}: lora_up has {} columns, lora_down {rank} rows",
                        self.key,
                        up.dim(1)?
                    )));
                }
                (Some(rank), up.matmul(&matrix(down, device)?)?)
            }
            LoraKind::LoHa { w1a, w1b, w2a, w2b } => {
                let rank = w1b.dim(0)?;
                let first = matrix(w1a, device)?.matmul(&matrix(w1b, device)?)?;
                let second = matrix(w2a, device)?.matmul(&matrix(w2b, device)?)?;
                (Some(rank), (first * second)?)
            }
            LoraKind::LoKr { w1, w1ab, w2, w2ab } => {
                let (w1, rank1) = match (w1, w1ab) {
                    (Some(w1), _) => (matrix(w1, device)?, None),
                    (None, Some((a, b))) => (
                        matrix(a, device)?.matmul(&matrix(b, device)?)?,
                        Some(a.dim(1)?),
                    ),
                    (None, None) => missing_factor(&self.key)?,
                };
                let (w2, rank2) = match (w2, w2ab) {
                    (Some(w2), _) => (w2.to_device(device)?.to_dtype(DType::F32)?, None),
                    (None, Some((a, b))) => {
                        // (o, r) @ (r, i, *k) -> (o, i, *k)
                        let dims = b.dims().to_vec();
                        let product = matrix(a, device)?.matmul(&matrix(b, device)?)?;
                        let mut shape = vec![product.dim(0)?];
                        shape.extend_from_slice(&dims[1..]);
                        (product.reshape(shape)?, Some(a.dim(1)?))
                    }
                    (None, None) => missing_factor(&self.key)?,
                };
                // LyCORIS: the rank of the first low-rank factor scales; whole factors: none.
                (rank1.or(rank2), kron(&w1, &w2)?)
            }
            LoraKind::Full { diff } => (None, diff.to_device(device)?.to_dtype(DType::F32)?),
        })
    }

    /// The change to a weight of shape `target` (f32 on `device`), alpha / rank included.
    pub fn delta(&self, target: &[usize], device: &Device) -> Result<Tensor> {
        let (rank, delta) = self.rank_and_delta(device)?;
        let elements: usize = target.iter().product();
        if delta.elem_count() != elements {
            return Err(EngineError::InvalidParameter(format!(
                "{}: changes {:?} values, the weight has {target:?}",
                self.key,
                delta.dims()
            )));
        }
        let scale = match (self.alpha, rank) {
            (Some(alpha), Some(rank)) if rank > 0 => alpha / rank as f64,
            _ => 1.0,
        };
        Ok((delta.reshape(target)? * scale)?)
    }
}

fn missing_factor<T>(key: &str) -> Result<T> {
    Err(EngineError::InvalidParameter(format!(
        "{key}: a LoKr module without its factors"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kron_matches_the_definition() {
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[0f32, 5.0], [6.0, 7.0]], &Device::Cpu).unwrap();
        let k = kron(&a, &b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            k,
            vec![
                vec![0.0, 5.0, 0.0, 10.0],
                vec![6.0, 7.0, 12.0, 14.0],
                vec![0.0, 15.0, 0.0, 20.0],
                vec![18.0, 21.0, 24.0, 28.0],
            ]
        );
    }

    #[test]
    fn a_conv_lora_composes_into_a_3x3_delta_scaled_by_alpha_over_rank() {
        let device = Device::Cpu;
        let down = Tensor::ones((2, 3, 3, 3), DType::F32, &device).unwrap();
        let up = Tensor::ones((4, 2, 1, 1), DType::F32, &device).unwrap();
        let module = LoraModule {
            key: "conv".into(),
            kind: LoraKind::LowRank { down, up },
            alpha: Some(1.0),
        };
        let delta = module.delta(&[4, 3, 3, 3], &device).unwrap();
        // Each value: sum over rank 2 of 1 * 1, times alpha / rank = 1/2.
        let values = delta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|&v| v == 1.0));
        assert!(
            module.delta(&[4, 3], &device).is_err(),
            "wrong shapes are refused"
        );
    }
}
