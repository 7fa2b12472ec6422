// sd-webui-lora-train: "Send to txt2img" puts the <lora:name:w> snippet into the txt2img prompt.
function loraTrainSendToTxt2img(text) {
    if (!text) {
        return;
    }
    var app = typeof gradioApp === "function" ? gradioApp() : document;
    var prompt = app.querySelector("#txt2img_prompt textarea");
    if (!prompt) {
        return;
    }
    var current = prompt.value.trim();
    if (current.indexOf(text) === -1) {
        prompt.value = current ? current + ", " + text : text;
    }
    // gradio only sees a value typed by the user: announce the change the way the WebUI's own scripts do
    if (typeof updateInput === "function") {
        updateInput(prompt);
    } else {
        prompt.dispatchEvent(new Event("input", {bubbles: true}));
    }
    if (typeof switch_to_txt2img === "function") {
        switch_to_txt2img();
    }
}
