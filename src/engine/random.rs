//! Full-size architectures with random weights, for measuring speed where real weights cannot
//! be downloaded (timing does not depend on the weight values).

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde::de::DeserializeOwned;

use super::clip::ClipTextEncoder;
use super::config::{ClipTextConfig, UNetConfig, VaeConfig};
use super::error::{EngineError, Result};
use super::pipeline::ModelFamily;
use super::unet::UNet;
use super::vae::VaeDecoder;

/// Hands out small Gaussian tensors for every weight asked for.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        _name: &str,
        _hint: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _device: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights have no fixed shape for {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // Answer as a current diffusers/transformers 4 checkpoint would.
        !name.ends_with("query.weight")
    }
}

/// A random-weight model: its components, built from published configs.
pub struct RandomModel {
    /// The family whose architecture this is.
    pub family: ModelFamily,
    /// One or two text encoders.
    pub text_encoders: Vec<ClipTextEncoder>,
    /// The UNet.
    pub unet: UNet,
    /// The VAE decoder.
    pub vae: VaeDecoder,
    /// The precision the VAE runs in.
    pub vae_dtype: DType,
}

fn parse<T: DeserializeOwned>(name: &str, text: &str) -> Result<T> {
    serde_json::from_str(text)
        .map_err(|e| EngineError::Unsupported(format!("built-in config {name}: {e}")))
}

impl RandomModel {
    /// Builds `sd15`, `sd21` (768-v) or `sdxl` with random weights in `dtype` on `device`.
    pub fn new(architecture: &str, device: &Device, dtype: DType) -> Result<Self> {
        Self::with_options(architecture, device, dtype, None, true)
    }

    /// [`RandomModel::new`] with the VAE in `vae_dtype` (default: f32 where the config asks
    /// to upcast from f16), and without text encoders unless `text_encoders`.
    pub fn with_options(
        architecture: &str,
        device: &Device,
        dtype: DType,
        vae_dtype: Option<DType>,
        text_encoders: bool,
    ) -> Result<Self> {
        let (family, unet, vae, encoders): (ModelFamily, &str, &str, Vec<&str>) = match architecture
        {
            "sd15" => (
                ModelFamily::Sd1,
                include_str!("../../assets/configs/sd15/unet.json"),
                include_str!("../../assets/configs/sd15/vae.json"),
                vec![include_str!("../../assets/configs/sd15/text_encoder.json")],
            ),
            "sd21" => (
                ModelFamily::Sd2,
                include_str!("../../assets/configs/sd21/unet.json"),
                include_str!("../../assets/configs/sd21/vae.json"),
                vec![include_str!("../../assets/configs/sd21/text_encoder.json")],
            ),
            "sdxl" => (
                ModelFamily::Sdxl,
                include_str!("../../assets/configs/sdxl/unet.json"),
                include_str!("../../assets/configs/sdxl/vae.json"),
                vec![
                    include_str!("../../assets/configs/sdxl/text_encoder.json"),
                    include_str!("../../assets/configs/sdxl/text_encoder_2.json"),
                ],
            ),
            other => {
                return Err(EngineError::InvalidParameter(format!(
                    "unknown architecture {other:?}; choose sd15, sd21 or sdxl"
                )));
            }
        };
        let vb = |dtype| VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
        let vae_config: VaeConfig = parse("vae", vae)?;
        let vae_dtype = if let Some(vae_dtype) = vae_dtype {
            vae_dtype
        } else if dtype == DType::F16 && vae_config.force_upcast && family == ModelFamily::Sdxl {
            DType::F32
        } else {
            dtype
        };
        let text_encoders = encoders
            .iter()
            .filter(|_| text_encoders)
            .map(|text| {
                let config: ClipTextConfig = parse("text_encoder", text)?;
                ClipTextEncoder::new(config, vb(dtype))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut vae = VaeDecoder::new(vae_config, vb(vae_dtype))?;
        // A VAE upcast from f16, as the pipeline does it (see StableDiffusion::load).
        vae.allow_tf32_convolutions(vae_dtype != dtype);
        Ok(Self {
            family,
            text_encoders,
            unet: UNet::new(parse::<UNetConfig>("unet", unet)?, vb(dtype))?,
            vae,
            vae_dtype,
        })
    }
}
