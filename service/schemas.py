"""Request and response schemas; they also document the API in the OpenAPI spec."""

import marshmallow as ma
from flask_smorest.fields import Upload


class UploadSchema(ma.Schema):
    """The multipart form of a prediction request. Other fields are ignored, as the template ignored them."""

    class Meta:
        # Documented as allowed (no additionalProperties: false), and dropped when parsing.
        unknown = ma.EXCLUDE

    image_file = ma.fields.List(
        Upload(metadata={"minLength": 1}),  # an empty file is refused
        required=True,
        validate=ma.validate.Length(min=1),
        metadata={
            "description": "One or more images (PNG, JPEG, GIF, BMP, WebP, TIFF); repeat the field for more.",
            # One item in the example makes Swagger UI's try-it-out start with a file chooser; with
            # none, it shows only an "Add string item" button.
            "example": [""],
        },
    )


class PredictQuerySchema(ma.Schema):
    """Query options of a prediction request."""

    top_k = ma.fields.Integer(
        validate=ma.validate.Range(min=1),
        metadata={
            "description": "Also return the k most probable labels, best first; a k over the number of labels "
            "returns them all."
        },
    )


class LabelProbabilitySchema(ma.Schema):
    """A label and the probability the model gives it."""

    label = ma.fields.String(required=True)
    probability = ma.fields.Float(required=True)


class PredictionSchema(ma.Schema):
    """The prediction for one uploaded image."""

    image_filename = ma.fields.String(
        required=True, allow_none=True, metadata={"description": "The filename the client sent, as sent."}
    )
    prediction = ma.fields.String(required=True, metadata={"description": "The most probable label."})
    confidence = ma.fields.Float(required=True, metadata={"description": "Softmax probability of the prediction."})
    top_k = ma.fields.List(
        ma.fields.Nested(LabelProbabilitySchema),
        metadata={"description": "The k most probable labels, best first; only when top_k is asked for."},
    )


class PredictResponseSchema(ma.Schema):
    """Predictions in upload order."""

    data = ma.fields.List(ma.fields.Nested(PredictionSchema), required=True)


class RolloutSchema(ma.Schema):
    """The outcome of the last rollout (a look at the model source on reload or when its alias moved)."""

    result = ma.fields.String(
        metadata={"description": "swapped; refused (never tried again); failed (could not fetch or check it now: "
                                 "tried again later)."}
    )
    version = ma.fields.String(allow_none=True, metadata={"description": "The version looked at."})
    reason = ma.fields.String(allow_none=True, metadata={"description": "Why it was refused or failed."})
    at = ma.fields.String(metadata={"description": "When (UTC, ISO 8601)."})


class ModelVersionSchema(ma.Schema):
    """What is being served, and where it came from."""

    model_uuid = ma.fields.String(
        allow_none=True,
        metadata={"description": "MLflow run id of the model; for a model with no run, the id of the folder it "
                                 "was fetched into (a logged model's id, or <name>-v<version>-<digest>)."},
    )
    model_path = ma.fields.String(metadata={"description": "The weights file being served."})
    sha256 = ma.fields.String(metadata={"description": "SHA-256 of the weights file."})
    architecture = ma.fields.String()
    device = ma.fields.String(metadata={"description": "cpu, cuda or mps."})
    engine = ma.fields.String(
        metadata={"description": "What runs the forward pass in this worker: onnxruntime (the network exported to "
                                 "ONNX, checked to give PyTorch's answers) or torch (INFERENCE_ENGINE)."}
    )
    labels = ma.fields.List(ma.fields.String())
    input_shape = ma.fields.List(ma.fields.Integer(), metadata={"description": "[channels, height, width]"})
    loaded_at = ma.fields.String(metadata={"description": "When this process loaded the model (UTC, ISO 8601)."})
    model_uri = ma.fields.String(allow_none=True, metadata={"description": "PRED_MODEL_URI, when served from MLflow."})
    model_name = ma.fields.String(allow_none=True, metadata={"description": "Registered model name, if any."})
    model_version = ma.fields.String(allow_none=True, metadata={"description": "Registered model version, if any."})
    model_source = ma.fields.String(
        allow_none=True,
        metadata={"description": "Where the model was fetched from: runs:/..., models:/m-... (a logged model) or a "
                                 "storage path such as s3://... (credentials and signed queries removed)."},
    )
    rollout = ma.fields.Nested(
        RolloutSchema, metadata={"description": "The last rollout's outcome; absent until the first rollout."}
    )


class VersionResponseSchema(ma.Schema):
    """The envelope of the version endpoint."""

    data = ma.fields.Nested(ModelVersionSchema, required=True)


class HealthSchema(ma.Schema):
    """A health probe's answer."""

    status = ma.fields.String(required=True, metadata={"description": "ok or unavailable"})
    reason = ma.fields.String(metadata={"description": "Why the service is not ready, in a few words."})
    detail = ma.fields.String(
        metadata={"description": "The whole reason (paths, upstream errors); only to requests carrying the API key."}
    )
