// Swagger UI (/docs) or ReDoc (/redoc), drawn from this server's /openapi.json. The spec is
// fetched here, with the API key when the server needs one, and handed to the renderer;
// Swagger UI's "Try it out" requests carry the same key.
"use strict";

(async () => {
  const status = document.getElementById("docs-status");
  let spec;
  try {
    const response = await gptKey.fetch("openapi.json");
    if (!response.ok) throw new Error("HTTP " + response.status);
    spec = await response.json();
  } catch (error) {
    status.textContent = "Could not load openapi.json: " + error.message;
    return;
  }
  status.remove();
  if (document.body.dataset.docs === "redoc") {
    Redoc.init(spec, { hideDownloadButton: false }, document.getElementById("redoc"));
    return;
  }
  window.ui = SwaggerUIBundle({
    spec,
    dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    validatorUrl: null, // the default asks a validator on another host
    requestInterceptor: (request) => {
      const key = gptKey.get();
      if (key) request.headers.Authorization = "Bearer " + key;
      return request;
    },
  });
})();
